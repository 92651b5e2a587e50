// saga console: renders Mermaid diagrams (also after htmx swaps) and the live uPlot charts.
(function () {
  "use strict";

  function renderDiagrams(root) {
    if (!window.mermaid) return;
    var nodes = (root || document).querySelectorAll("pre.mermaid:not([data-processed])");
    if (!nodes.length) return;
    window.mermaid.run({ nodes: nodes }).then(function () {
      nodes.forEach(function (node) {
        var svg = node.querySelector("svg");
        if (svg) {
          svg.setAttribute("role", "img");
          svg.setAttribute("aria-label", "Sequence diagram of the order's saga");
        }
        node.setAttribute("data-rendered", "true");
      });
    }).catch(function (err) {
      nodes.forEach(function (node) { node.setAttribute("data-render-error", String(err)); });
    });
  }

  var PALETTE = ["#0550ae", "#bc4c00", "#1a7f37", "#8250df"];

  function makeChart(el, data) {
    var block = data[el.dataset.series];
    var names = Object.keys(block);
    var opts = {
      width: Math.max(el.clientWidth, 300),
      height: 240,
      series: [{}].concat(names.map(function (name, i) {
        return { label: name, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true };
      })),
      axes: [{}, { label: el.dataset.unit, size: 60 }],
      scales: { y: { range: function (u, min, max) { return [0, Math.max(max || 0, 1)]; } } },
      legend: { live: true },
    };
    var chart = new window.uPlot(opts, toColumns(data, block, names), el);
    window.addEventListener("resize", function () {
      chart.setSize({ width: Math.max(el.clientWidth, 300), height: 240 });
    });
    return { chart: chart, names: names };
  }

  function toColumns(data, block, names) {
    return [data.t].concat(names.map(function (name) { return block[name]; }));
  }

  function startCharts() {
    var els = document.querySelectorAll(".chart[data-series]");
    if (!els.length || !window.uPlot) return;
    var charts = [];
    function refresh() {
      fetch("/api/samples", { headers: { Accept: "application/json" } })
        .then(function (r) {
          // the session ended: to the login page, as htmx does for the live fragments
          if (r.status === 401) { window.location.href = r.headers.get("HX-Redirect") || "/login"; }
          if (!r.ok) { throw new Error(r.status); }
          return r.json();
        })
        .then(function (data) {
          if (!charts.length) {
            els.forEach(function (el) { charts.push(makeChart(el, data)); el.dataset.ready = "true"; });
          } else {
            charts.forEach(function (c, i) {
              var block = data[els[i].dataset.series];
              c.chart.setData(toColumns(data, block, c.names));
            });
          }
        })
        .catch(function () { /* the overview shows what cannot be read */ });
    }
    refresh();
    setInterval(refresh, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (window.mermaid) {
      window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "default",
        sequence: { showSequenceNumbers: false, mirrorActors: false } });
    }
    renderDiagrams(document);
    startCharts();
    document.body.addEventListener("htmx:afterSettle", function () { renderDiagrams(document); });
  });
})();
