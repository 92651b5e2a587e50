"""py-spy profiles of every process of the end-to-end system (`saga bench --profile DIR`).

Each profiled Procfile command runs under `py-spy record`, which launches it (attaching to a
running process needs ptrace rights a sandbox often lacks) and, when the bench stops the
system, writes collapsed stacks to DIR/<process>.txt: load them in speedscope or
flamegraph.pl, or read the summary this module prints, the functions holding the most samples
per process. Where py-spy cannot tell an idle thread (some sandboxes), waits are sampled too.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLES_PER_SECOND = 20  # enough for where the time goes, little enough not to move it


@dataclass(frozen=True)
class Profile:
    """Where the stacks go, and which Procfile processes to profile (none named: all)."""

    directory: Path
    processes: tuple[str, ...] = ()

    def command(self, name: str, command: str) -> str:
        """The Procfile command of process `name`: under py-spy if it is profiled, its stacks
        written to directory/name.txt (gunicorn's workers included: --subprocesses)."""
        if self.processes and name not in self.processes:
            return command
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if py_spy is None:
            raise RuntimeError("--profile needs py-spy: pip install -e '.[bench]'")
        output = self.directory / f"{name}.txt"
        return (
            f"{shlex.quote(py_spy)} record --subprocesses --nonblocking --format raw"
            f" --rate {SAMPLES_PER_SECOND} --output {shlex.quote(str(output))} -- {command}"
        )


def finish(root_pid: int, timeout: float = 20.0) -> None:
    """Ask every py-spy under `root_pid` to write its stacks now (SIGINT; SIGTERM would lose
    them) and wait until they have."""
    recorders = [
        child
        for child in psutil.Process(root_pid).children(recursive=True)
        if child.name() == "py-spy"
    ]
    for recorder in recorders:
        recorder.send_signal(signal.SIGINT)
    psutil.wait_procs(recorders, timeout=timeout)


def hottest(
    stacks: Path, top: int = 15, skip: tuple[str, ...] = ("<frozen importlib",)
) -> tuple[int, list[tuple[str, int]]]:
    """(samples, [(function, samples in which it is on the stack)]) of one collapsed-stacks
    file, most first; stacks through `skip` (start-up imports) left out."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or any(s in frames for s in skip):
            continue
        n = int(count)
        total += n
        # a frame is "function (file:line)"; one count per function per stack
        seen = {frame.rsplit(":", 1)[0] for frame in frames.split(";")}
        for function in seen:
            inclusive[function] += n
    return total, inclusive.most_common(top)


def summary(directory: Path, top: int = 15) -> str:
    """The hottest functions of each profiled process, as text."""
    lines = [f"Profiles in {directory} (collapsed stacks; % of the process's samples)"]
    for stacks in sorted(directory.glob("*.txt")):
        total, functions = hottest(stacks, top)
        lines.append(f"  {stacks.stem}: {total} samples")
        for function, n in functions:
            lines.append(f"    {100 * n / max(total, 1):5.1f}%  {function}")
    return "\n".join(lines)
