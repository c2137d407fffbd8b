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

  /* Bars scaled to each instrument's range (as fhir_kat/instruments/chart.py), with a y axis
     in % of the range, each instrument's cut-off as a dashed line, and the means in units. */
  function chart(report) {
    const W = 640, H = 340, L = 56, R = 16, T = 40, B = 56, BAR = 36, colours = { baseline: "#5f6f86", post: "#1d6fc2" };
    const groups = report.group || [];
    const slot = (W - L - R) / Math.max(groups.length, 1);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-labelledby": "chart-title chart-desc" });
    root.append(svg("title", { id: "chart-title" }, "Mean baseline vs post score per instrument"));
    const y = (share) => H - B - (H - T - B) * share;
    const described = [];
    [0, 0.5, 1].forEach((share) => {
      root.append(svg("line", { x1: L - 4, y1: y(share), x2: W - R, y2: y(share), stroke: share ? "#d5dae0" : "#333" }));
      root.append(svg("text", { x: L - 8, y: y(share) + 4, "text-anchor": "end", "font-size": 11 }, (share * 100) + " %"));
    });
    root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#333" }));
    root.append(svg("text", { x: 14, y: (T + H - B) / 2, "font-size": 11, "text-anchor": "middle", transform: "rotate(-90 14 " + ((T + H - B) / 2) + ")" }, "Mean total (% of scale)"));
    groups.forEach((g, i) => {
      const inst = instrumentOf(g);
      const x0 = L + i * slot + (slot - 2 * BAR) / 2;
      const parts = [];
      [["baseline", mean(g, "mean-baseline")], ["post", mean(g, "mean-post")]].forEach(([label, value], j) => {
        if (value === null || !inst.max) return;
        const share = (value - (inst.min || 0)) / (inst.max - (inst.min || 0));
        const x = x0 + j * BAR, top = y(share);
        const rect = svg("rect", { x: x.toFixed(1), y: top.toFixed(1), width: BAR - 4, height: (H - B - top).toFixed(1), fill: colours[label] });
        rect.append(svg("title", {}, label + " mean " + value + " " + (inst.unit || "")));
        root.append(rect, svg("text", { x: (x + (BAR - 4) / 2).toFixed(1), y: (top - 4).toFixed(1), "text-anchor": "middle", "font-size": 11 }, String(value)));
        parts.push(label + " " + value + " " + (inst.unit || ""));
      });
      if (inst.max && inst.positive_at !== undefined) {
        const cy = y((inst.positive_at - (inst.min || 0)) / (inst.max - (inst.min || 0)));
        root.append(svg("line", { x1: x0 - 6, y1: cy.toFixed(1), x2: x0 + 2 * BAR + 2, y2: cy.toFixed(1), stroke: "#8a1c1c", "stroke-width": 2, "stroke-dasharray": "6 4" }));
      }
      root.append(svg("text", { x: (L + i * slot + slot / 2).toFixed(1), y: H - B + 18, "text-anchor": "middle", "font-size": 12 }, inst.title + " (n=" + count(g, "denominator") + ")"));
      root.append(svg("text", { x: (L + i * slot + slot / 2).toFixed(1), y: H - B + 34, "text-anchor": "middle", "font-size": 11 }, "cut-off " + inst.positive_at + " " + (inst.unit || "")));
      described.push(inst.title + ": " + (parts.join(", ") || "no data") + ", cut-off " + inst.positive_at);
    });
    Object.entries(colours).forEach(([label, colour], k) => {
      root.append(svg("rect", { x: L + k * 90, y: 12, width: 12, height: 12, fill: colour }));
      root.append(svg("text", { x: L + 16 + k * 90, y: 22, "font-size": 11 }, label + " mean"));
    });
    root.append(svg("line", { x1: L + 190, y1: 18, x2: L + 214, y2: 18, stroke: "#8a1c1c", "stroke-width": 2, "stroke-dasharray": "6 4" }));
    root.append(svg("text", { x: L + 220, y: 22, "font-size": 11 }, "cut-off"));
    root.append(svg("desc", { id: "chart-desc" }, described.join("; ")));
    document.getElementById("chart").replaceChildren(root);
  }

  const HEADER = ["Cohort", "Instrument", "Screened positive", "With post data", "Improved", "% improved"];

  function csvCell(text) {
    const t = String(text);
    return /[",\n]/.test(t) ? '"' + t.replace(/"/g, '""') + '"' : t;
  }

  /* The CSV is the table's figures, which are $evaluate-measure's (the browser tests compare). */
  function downloads(rows, reports) {
    const lines = [HEADER, ...rows.map((tr) => [...tr.querySelectorAll("th, td")].map((c) => c.textContent))];
    const csv = document.getElementById("download-csv");
    csv.href = "data:text/csv;charset=utf-8," + encodeURIComponent(lines.map((l) => l.map(csvCell).join(",")).join("\r\n") + "\r\n");
    csv.removeAttribute("aria-disabled");
    const json = document.getElementById("download-json");
    const body = reports.length === 1 ? reports[0] : { resourceType: "Bundle", type: "collection", entry: reports.map((r) => ({ resource: r })) };
    json.href = "data:application/fhir+json;charset=utf-8," + encodeURIComponent(JSON.stringify(body, null, 2));
    json.removeAttribute("aria-disabled");
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
      const who = Kat.el("td");
      who.append(Kat.el("a", "Participant", { href: "/app/participants/" + encodeURIComponent(((f.subject || {}).reference || "").split("/")[1] || "") }));
      tr.append(who, Kat.el("td", what), Kat.el("td", Kat.when((f.period || {}).start)));
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
    const reports = [overall];
    const rows = (overall.group || []).map((g) => row("All participants", g));
    chart(overall);
    const cohorts = await Kat.api("GET", "/fhir/Group?_count=100").catch(() => ({ entry: [] }));
    for (const e of cohorts.entry || []) {
      const group = e.resource;
      const report = await Kat.api("GET", base + "&subject=" + encodeURIComponent("Group/" + group.id));
      reports.push(report);
      rows.push(...(report.group || []).map((g) => row(group.name || "Group " + group.id, g)));
    }
    document.querySelector("#outcomes tbody").replaceChildren(...rows);
    downloads(rows, reports);
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
