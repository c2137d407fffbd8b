/* The program dashboard: $evaluate-measure overall and per cohort Group, a bar chart of mean
   baseline vs post scores, the referral funnel from Task counts, and (staff) the open safety
   Flags. Every figure comes from the service's FHIR API with this session's permissions. */
"use strict";
(function () {
  const instruments = JSON.parse(document.getElementById("instruments").textContent);
  const summary = document.getElementById("error-summary");
  const status = document.getElementById("dashboard-status");
  const POP = "http://terminology.hl7.org/CodeSystem/measure-population";
  // The deployment's canonical base (ADR 0020), handed over by the page.
  const EXT = JSON.parse(document.getElementById("extension-base").textContent);
  const TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code|fulfill";
  const SVG = "http://www.w3.org/2000/svg";

  function instrumentOf(group) {
    const c = ((group.code || {}).coding || [])[0] || {};
    return instruments.find((i) => i.code === c.code && i.system === c.system) || { title: c.display || c.code, max: null };
  }

  function count(group, code) {
    const p = (group.population || []).find((x) => ((x.code || {}).coding || []).some((c) => c.system === POP && c.code === code));
    if (!p) return 0;
    // A count of too few people to publish is withheld (data-absent-reason "masked").
    return p.count !== undefined ? p.count : "withheld";
  }

  function mean(group, name) {
    const e = (group.extension || []).find((x) => x.url === EXT + name);
    return e ? e.valueQuantity.value : null;
  }

  function row(cohort, group) {
    const tr = document.createElement("tr");
    const inst = instrumentOf(group);
    const score = group.measureScore ? group.measureScore.value : null;
    const cells = [cohort, inst.title, count(group, "initial-population"), count(group, "denominator"),
      count(group, "numerator"), score === null ? "—" : (Math.round(score * 1000) / 10).toFixed(1) + " %"];
    cells.forEach((text, i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.setAttribute("scope", "row");
      cell.textContent = String(text);
      tr.append(cell);
    });
    tr.dataset.instrument = inst.title;
    tr.dataset.cohort = cohort;
    return tr;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /* Same layout as fhir_kat/instruments/chart.py: bars scaled to each instrument's maximum. */
  function chart(report) {
    const W = 640, H = 320, M = 48, BAR = 36, colours = { baseline: "#5f6f86", post: "#1d6fc2" };
    const groups = report.group || [];
    const slot = (W - 2 * M) / Math.max(groups.length, 1);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-labelledby": "chart-title chart-desc" });
    root.append(svg("title", { id: "chart-title" }, "Mean baseline vs post score per instrument"));
    const described = [];
    root.append(svg("line", { x1: M, y1: H - M, x2: W - M, y2: H - M, stroke: "#333" }));
    groups.forEach((g, i) => {
      const inst = instrumentOf(g);
      const x0 = M + i * slot + (slot - 2 * BAR) / 2;
      const parts = [];
      [["baseline", mean(g, "mean-baseline")], ["post", mean(g, "mean-post")]].forEach(([label, value], j) => {
        if (value === null || !inst.max) return;
        const h = (H - 2 * M) * value / inst.max;
        const x = x0 + j * BAR, y = H - M - h;
        const rect = svg("rect", { x: x.toFixed(1), y: y.toFixed(1), width: BAR - 4, height: h.toFixed(1), fill: colours[label] });
        rect.append(svg("title", {}, label + " mean " + value));
        root.append(rect, svg("text", { x: (x + (BAR - 4) / 2).toFixed(1), y: (y - 4).toFixed(1), "text-anchor": "middle", "font-size": 11 }, String(value)));
        parts.push(label + " " + value);
      });
      root.append(svg("text", { x: (M + i * slot + slot / 2).toFixed(1), y: H - M + 18, "text-anchor": "middle", "font-size": 12 }, inst.title + " (n=" + count(g, "denominator") + ")"));
      described.push(inst.title + ": " + (parts.join(", ") || "no data"));
    });
    Object.entries(colours).forEach(([label, colour], k) => {
      root.append(svg("rect", { x: W - M - 150 + k * 80, y: 20, width: 12, height: 12, fill: colour }));
      root.append(svg("text", { x: W - M - 134 + k * 80, y: 30, "font-size": 11 }, label));
    });
    root.append(svg("desc", { id: "chart-desc" }, described.join("; ")));
    document.getElementById("chart").replaceChildren(root);
  }

  async function funnel() {
    const stages = {
      received: "/fhir/Task?code=" + encodeURIComponent(TASK_CODE) + "&_summary=count",
      accepted: "/fhir/Task?code=" + encodeURIComponent(TASK_CODE) + "&status=accepted,in-progress,completed&_summary=count",
      completed: "/fhir/Task?code=" + encodeURIComponent(TASK_CODE) + "&status=completed&_summary=count",
    };
    for (const [stage, url] of Object.entries(stages)) {
      const bundle = await Kat.api("GET", url);
      document.querySelector('#funnel td[data-stage="' + stage + '"]').textContent = String(bundle.total);
    }
  }

  async function flags() {
    const table = document.getElementById("flags");
    if (!table) return;
    // The open safety Flags (Flag?status and ?category are fhir_kat's own search parameters:
    // R4 has none for Flag). Acknowledged ones say so; resolving goes through the API.
    const category = encodeURIComponent("http://terminology.hl7.org/CodeSystem/flag-category|safety");
    const bundle = await Kat.api("GET", "/fhir/Flag?status=active&category=" + category + "&_count=100");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const e of bundle.entry || []) {
      const f = e.resource;
      const tr = document.createElement("tr");
      const acknowledged = (f.extension || []).some((x) => (x.url || "").endsWith("/flag-acknowledgement"));
      const what = ((f.code || {}).text || Kat.codingText(f.code)) + (acknowledged ? " (acknowledged)" : "");
      for (const text of [(f.subject || {}).reference || "", what, (f.period || {}).start || ""]) {
        tr.append(Kat.el("td", text));
      }
      body.append(tr);
    }
    if (!body.children.length) {
      const tr = document.createElement("tr");
      tr.append(Kat.el("td", "No open flags.", { colspan: "3" }));
      body.append(tr);
    }
  }

  async function outcomes(start, end) {
    const base = "/fhir/Measure/kat-program-outcomes/$evaluate-measure?periodStart=" + encodeURIComponent(start) + "&periodEnd=" + encodeURIComponent(end);
    const overall = await Kat.api("GET", base);
    const rows = (overall.group || []).map((g) => row("All participants", g));
    chart(overall);
    const cohorts = await Kat.api("GET", "/fhir/Group?_count=100").catch(() => ({ entry: [] }));
    for (const e of cohorts.entry || []) {
      const group = e.resource;
      const report = await Kat.api("GET", base + "&subject=" + encodeURIComponent("Group/" + group.id));
      rows.push(...(report.group || []).map((g) => row(group.name || "Group " + group.id, g)));
    }
    document.querySelector("#outcomes tbody").replaceChildren(...rows);
  }

  async function load() {
    Kat.clearErrors(summary);
    status.textContent = "Loading…";
    const start = document.getElementById("period-start").value;
    const end = document.getElementById("period-end").value;
    const results = await Promise.allSettled([outcomes(start, end), funnel(), flags()]);
    const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    if (failed.length) {
      Kat.showErrors(summary, failed.flatMap((e) => e.messages || [{ text: String(e) }]), "Some figures could not be loaded");
      status.textContent = "Some figures could not be loaded.";
    } else {
      status.textContent = "Figures for " + start + " to " + end + " loaded.";
    }
    document.body.dataset.loaded = "true";
  }

  document.getElementById("period").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  load();
})();
