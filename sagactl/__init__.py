"""The `saga` command line: run the processes, the dev stack and inspect the system."""
