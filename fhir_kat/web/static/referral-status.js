/* A referral's live status: polls its Task and shows status, business status and reason, and
   renders the documents in Task.output (e.g. the feedback Composition) for people. */
"use strict";
(function () {
  const section = document.getElementById("referral-status");
  const taskId = section.dataset.task;
  const live = document.getElementById("status-live");
  const outputs = document.getElementById("task-outputs");
  const summary = document.getElementById("error-summary");
  const POLL_MS = 3000;
  const MAX_POLLS = 400; // about 20 minutes, then the page asks for a reload
  let last = "";
  let polls = 0;
  const rendered = new Map();

  function set(id, text) { document.getElementById(id).textContent = text || "—"; }

  function narrativeText(resource) {
    const div = resource && resource.text && resource.text.div;
    if (!div) return "";
    // Parsed as an inert document: nothing runs, only the text is shown.
    return new DOMParser().parseFromString(div, "text/html").body.textContent.trim();
  }

  function renderDocument(resource) {
    const article = Kat.el("article", null, { class: "document" });
    const title = resource.title || resource.description || resource.resourceType;
    article.append(Kat.el("h3", title));
    const meta = [];
    if (resource.date) meta.push("Dated " + resource.date);
    if (resource.status) meta.push("status " + resource.status);
    if (meta.length) article.append(Kat.el("p", meta.join(", "), { class: "hint" }));
    const text = narrativeText(resource);
    if (text) article.append(Kat.el("p", text));
    for (const s of resource.section || []) {
      article.append(Kat.el("h4", s.title || Kat.codingText(s.code) || "Section"));
      const t = narrativeText(s);
      if (t) article.append(Kat.el("p", t));
    }
    for (const c of resource.content || []) {
      const a = c.attachment || {};
      if (a.title || a.url) article.append(Kat.el("p", "Attachment: " + (a.title || a.url)));
    }
    return article;
  }

  async function showOutputs(task) {
    const refs = (task.output || []).map((o) => (o.valueReference || {}).reference).filter(Boolean);
    if (!refs.length) return;
    for (const ref of refs) {
      if (rendered.has(ref)) continue;
      try {
        // A feedback Composition is read as its document ($document): referrers may read
        // that (when the participant's consent permits) but not Compositions in general.
        const isComposition = ref.startsWith("Composition/");
        const got = await Kat.api("GET", "/fhir/" + ref + (isComposition ? "/$document" : ""));
        const resource = isComposition ? ((got.entry || [])[0] || {}).resource || got : got;
        rendered.set(ref, renderDocument(resource));
      } catch (e) {
        const msg = e.status === 403 || e.status === 404 ? "A document (" + ref.split("/")[0] + ") is not available to you." : (e.messages || [{ text: String(e) }])[0].text;
        rendered.set(ref, Kat.el("p", msg));
      }
    }
    outputs.replaceChildren(...rendered.values());
  }

  let named = false;
  /* Name the referral and its patient once: the patient as far as this session may read it
     (a referrer reads the patients of its own referrals, ADR 0096; otherwise its referral
     number identifies the patient). */
  async function about(task) {
    if (named) return;
    named = true;
    const number = KatReferral.number(task);
    set("referral-number", number);
    set("referral-sent", Kat.when(task.authoredOn));
    let patientText = "Not shown to you: your referral number identifies the patient in your records.";
    const ref = (task.for || {}).reference || "";
    if (ref.startsWith("Patient/")) {
      try {
        const patient = await Kat.api("GET", "/fhir/" + ref);
        const phn = Kat.patientPhn(patient);
        patientText = (Kat.patientName(patient) || "Name not recorded") + (phn ? ", PHN " + phn : "");
      } catch (e) {
        if (e.status !== 403 && e.status !== 404) throw e;
      }
    }
    set("referral-patient", patientText);
    document.getElementById("referral-about").hidden = false;
    const title = "Referral " + (number || "") + (patientText.startsWith("Not shown") ? "" : " — " + patientText);
    document.getElementById("referral-title").textContent = title.trim();
  }

  async function poll() {
    polls += 1;
    try {
      const task = await Kat.api("GET", "/fhir/Task/" + encodeURIComponent(taskId));
      Kat.clearErrors(summary);
      document.getElementById("status-details").hidden = false;
      const statusText = KatReferral.statusText(task);
      await about(task);
      set("task-next", KatReferral.next(task));
      set("task-status", statusText);
      set("task-business-status", Kat.codingText(task.businessStatus));
      set("task-status-reason", Kat.codingText(task.statusReason));
      set("task-last-modified", task.lastModified || (task.meta || {}).lastUpdated);
      const summaryLine = "Referral status: " + statusText + (task.businessStatus ? " — " + Kat.codingText(task.businessStatus) : "");
      if (summaryLine !== last) { live.textContent = summaryLine; last = summaryLine; }
      await showOutputs(task);
    } catch (e) {
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The status could not be loaded");
      if (e.status === 401 || e.status === 403 || e.status === 404) return;
    }
    if (polls < MAX_POLLS) setTimeout(poll, POLL_MS);
    else live.textContent = "Stopped checking for changes; reload the page to continue.";
  }

  if (new URLSearchParams(location.search).has("submitted")) live.textContent = "Referral received.";
  poll();
})();
