/* The referral form: builds the referral artifact from the fields (data-path), checks it
   against the artifact's JSON Schema as the person types, posts it to /api/v1/referrals and
   opens the referral's status page. */
"use strict";
(function () {
  const form = document.getElementById("referral-form");
  const summary = document.getElementById("error-summary");
  const status = document.getElementById("form-status");
  const sourceId = "web-form-" + (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()));
  const touched = new Set();
  let schema = null;

  function setPath(obj, path, value) {
    const steps = path.split(".");
    let node = obj;
    for (const step of steps.slice(0, -1)) node = node[step] = node[step] || {};
    node[steps[steps.length - 1]] = value;
  }

  function collect() {
    const artifact = { source_id: sourceId, authored_on: Kat.nowWithOffset() };
    for (const node of form.querySelectorAll("[data-path]")) {
      const path = node.dataset.path;
      const widget = node.dataset.widget;
      if (widget === "text" || widget === "names") {
        const value = node.value.trim();
        if (!value) continue;
        setPath(artifact, path, widget === "names" ? value.split(/\s+/) : value);
      } else if (widget === "codes") {
        const codes = [...node.querySelectorAll("input:checked")].map((i) => ({ code: i.value }));
        if (codes.length) setPath(artifact, path, codes);
      } else if (widget === "bool3") {
        const chosen = node.querySelector("input:checked");
        if (chosen && chosen.value) setPath(artifact, path, chosen.value === "true");
      } else if (widget === "conditions") {
        /* Coded conditions from the EMR's problem list (a SMART launch's prefill): the ones
           left ticked go as the EMR codes them. */
        const conditions = [...node.querySelectorAll("input:checked")].map((i) => {
          const c = { system: i.dataset.system, code: i.value };
          if (i.dataset.display) c.display = i.dataset.display;
          return c;
        });
        if (conditions.length) setPath(artifact, path, conditions);
      } else if (widget === "flags") {
        const flags = [];
        for (const flag of node.querySelectorAll("fieldset.flag")) {
          const chosen = flag.querySelector("input:checked");
          if (chosen && chosen.value) flags.push({ code: flag.dataset.code, value: chosen.value === "true" });
        }
        if (flags.length) setPath(artifact, path, flags);
      }
    }
    return artifact;
  }

  /* The field a problem's path belongs to: the longest data-path that prefixes it. */
  function fieldFor(path) {
    let best = null;
    for (const node of form.querySelectorAll("[data-path]")) {
      const p = node.dataset.path;
      if ((path === p || path.startsWith(p + ".") || path.startsWith(p + "[")) && (!best || p.length > best.dataset.path.length)) best = node;
    }
    return best;
  }

  function labelOf(node) {
    if (node.tagName === "FIELDSET") return node.querySelector("legend").textContent.replace("*", "").trim();
    const label = form.querySelector('label[for="' + node.id + '"]');
    return label ? label.textContent.replace("*", "").trim() : node.dataset.path;
  }

  function render(problems, onlyTouched) {
    const byField = new Map();
    const unplaced = [];
    for (const p of problems) {
      const node = fieldFor(p.path);
      if (!node) { unplaced.push(p); continue; }
      if (!byField.has(node)) byField.set(node, []);
      byField.get(node).push(p.text);
    }
    for (const node of form.querySelectorAll("[data-path]")) {
      const show = byField.has(node) && (!onlyTouched || touched.has(node));
      const error = document.getElementById(node.id + "-error");
      if (!error) continue;
      error.textContent = show ? labelOf(node) + " " + byField.get(node).join("; ") : "";
      error.hidden = !show;
      node.setAttribute("aria-invalid", show ? "true" : "false");
    }
    return { byField, unplaced };
  }

  function problemsNow() { return schema ? Kat.validate(schema, collect()) : []; }

  form.addEventListener("focusout", (ev) => {
    const node = ev.target.closest("[data-path]");
    if (node) { touched.add(node); render(problemsNow(), true); }
  });
  form.addEventListener("change", (ev) => {
    const node = ev.target.closest("[data-path]");
    if (node) { touched.add(node); render(problemsNow(), true); }
  });

  function summarise(byField, unplaced, heading) {
    const messages = [];
    for (const [node, texts] of byField) messages.push({ text: labelOf(node) + " " + texts.join("; "), field: node });
    for (const p of unplaced) messages.push({ text: (p.path ? p.path + ": " : "") + p.text });
    Kat.showErrors(summary, messages, heading);
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    Kat.clearErrors(summary);
    const artifact = collect();
    const problems = schema ? Kat.validate(schema, artifact) : [];
    if (problems.length) {
      const { byField, unplaced } = render(problems, false);
      summarise(byField, unplaced, "Please correct " + problems.length + (problems.length === 1 ? " answer" : " answers"));
      return;
    }
    const button = document.getElementById("submit-referral");
    button.disabled = true;
    status.textContent = "Sending the referral…";
    try {
      const bundle = await Kat.api("POST", "/api/v1/referrals", artifact);
      const task = (bundle.entry || []).map((e) => (e.response || {}).location || "").find((l) => l.startsWith("Task/"));
      status.textContent = "Referral received.";
      if (task) location.assign("/app/referrals/" + encodeURIComponent(task.split("/")[1]) + "?submitted=1");
    } catch (e) {
      status.textContent = "";
      const problems2 = (e.messages || [{ text: String(e) }]).map((m) => ({ path: m.expression || "", text: m.text, login: m.login }));
      const { byField, unplaced } = render(problems2.filter((p) => !p.login), false);
      summarise(byField, unplaced, "The service did not accept the referral");
      if (problems2.some((p) => p.login)) Kat.showErrors(summary, e.messages, "Your session has ended");
    } finally {
      button.disabled = false;
    }
  });

  Kat.api("GET", form.dataset.schema).then((s) => { schema = s; }).catch((e) => {
    Kat.showErrors(summary, e.messages || [{ text: "The form's rules could not be loaded; the service will still check the referral." }]);
  });
})();
