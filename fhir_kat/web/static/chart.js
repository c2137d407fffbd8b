/* Small SVG charts with axes, units, bands and cut-off lines; text alternatives included.
   Hand-written (no dependency): everything is created as DOM nodes, never as HTML text. */
"use strict";
window.KatChart = (function () {
  const SVG = "http://www.w3.org/2000/svg";
  const BAND_FILLS = ["#eef5ec", "#f7f3e3", "#f9ebdd", "#f6e0dc", "#f1d6d9"];

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /* A score over time: points = [{when: Date, value: number, label}], inst = the instrument's
     range, unit, bands and positive_at (the cut-off). */
  function timeSeries(id, inst, points) {
    const W = 700, H = 280, L = 56, R = 210, T = 16, B = 44;
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-labelledby": id + "-title " + id + "-desc" });
    root.append(svg("title", { id: id + "-title" }, inst.title + " total score over time"));
    const y = (v) => T + (H - T - B) * (1 - (v - inst.min) / (inst.max - inst.min));
    const times = points.map((p) => p.when.getTime());
    const t0 = Math.min(...times), t1 = Math.max(...times);
    const x = (t) => (t1 === t0 ? (L + W - R) / 2 : L + (W - R - L) * (t - t0) / (t1 - t0));
    inst.bands.forEach((b, i) => {
      const top = i + 1 < inst.bands.length ? inst.bands[i + 1].min : inst.max;
      root.append(svg("rect", { x: L, y: y(top).toFixed(1), width: W - R - L, height: (y(b.min) - y(top)).toFixed(1), fill: BAND_FILLS[i % BAND_FILLS.length] }));
      root.append(svg("text", { x: W - R + 6, y: ((y(b.min) + y(top)) / 2 + 4).toFixed(1), "font-size": 11, fill: "#333" }, b.display));
    });
    const cut = y(inst.positive_at);
    root.append(svg("line", { x1: L, y1: cut.toFixed(1), x2: W - R, y2: cut.toFixed(1), stroke: "#8a1c1c", "stroke-dasharray": "6 4", "stroke-width": 2 }));
    root.append(svg("text", { x: L + 4, y: (cut - 4).toFixed(1), "font-size": 11, fill: "#8a1c1c" }, "cut-off " + inst.positive_at));
    root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#333" }));
    root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#333" }));
    [inst.min, (inst.min + inst.max) / 2, inst.max].forEach((v) => {
      root.append(svg("text", { x: L - 6, y: (y(v) + 4).toFixed(1), "text-anchor": "end", "font-size": 11 }, String(Math.round(v * 10) / 10)));
    });
    root.append(svg("text", { x: 14, y: ((T + H - B) / 2).toFixed(1), "font-size": 11, transform: "rotate(-90 14 " + ((T + H - B) / 2).toFixed(1) + ")", "text-anchor": "middle" }, "Total (" + inst.unit + ")"));
    root.append(svg("text", { x: ((L + W - R) / 2).toFixed(1), y: H - 6, "text-anchor": "middle", "font-size": 11 }, "Date"));
    const path = points.map((p, i) => (i ? "L" : "M") + x(p.when.getTime()).toFixed(1) + " " + y(p.value).toFixed(1)).join(" ");
    if (points.length > 1) root.append(svg("path", { d: path, fill: "none", stroke: "#1d5fa8", "stroke-width": 2 }));
    points.forEach((p, i) => {
      const cx = x(p.when.getTime()), cy = y(p.value);
      root.append(svg("circle", { cx: cx.toFixed(1), cy: cy.toFixed(1), r: 4, fill: "#1d5fa8" }));
      root.append(svg("text", { x: cx.toFixed(1), y: (cy - 8).toFixed(1), "text-anchor": "middle", "font-size": 11 }, String(p.value)));
      if (i === 0 || i === points.length - 1) {
        root.append(svg("text", { x: cx.toFixed(1), y: H - B + 16, "text-anchor": "middle", "font-size": 11 }, p.label));
      }
    });
    root.append(svg("desc", { id: id + "-desc" }, points.map((p) => p.label + ": " + p.value).join("; ") + ". Cut-off " + inst.positive_at + "."));
    return root;
  }

  return { svg, timeSeries };
})();
