/* "My referrals": the referral Tasks this session may see (a referrer: its clinic's; the API
   decides, ADR 0015), with their patients as the API includes them (a referrer: the patients
   of its own referrals, ADR 0096), newest first, and a search over the rows shown. */
"use strict";
(function () {
  const status = document.getElementById("referrals-status");
  const summary = document.getElementById("error-summary");
  const body = document.querySelector("#referrals tbody");
  const search = document.getElementById("referral-search");
  const TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code|fulfill";
  let rows = [];

  function patientRef(task) { return ((task.for || {}).reference || ""); }

  function render() {
    const q = search.value.trim().toLowerCase();
    const shown = rows.filter((r) => !q || r.text.includes(q));
    body.replaceChildren(...shown.map((r) => r.tr));
    if (!rows.length) status.textContent = "No referrals yet.";
    else status.textContent = shown.length + " of " + rows.length + " referrals shown.";
  }

  async function load() {
    try {
      const entries = await Kat.searchAll("/fhir/Task?code=" + encodeURIComponent(TASK_CODE) + "&_include=Task:patient&_count=100", 20);
      const { patients, matches: tasks } = Kat.split(entries, "Task");
      tasks.sort((a, b) => String(b.authoredOn || "").localeCompare(String(a.authoredOn || "")));
      rows = tasks.map((task) => {
        const patient = patients.get(patientRef(task));
        const name = patient ? Kat.patientName(patient) || "Name not recorded" : "Not shown to you";
        const phn = patient ? Kat.patientPhn(patient) || "—" : "—";
        const number = KatReferral.number(task) || "Referral of " + Kat.when(task.authoredOn);
        const tr = document.createElement("tr");
        tr.append(Kat.el("td", Kat.when(task.authoredOn)));
        const ref = Kat.el("th", null, { scope: "row" });
        ref.append(Kat.el("a", number, { href: "/app/referrals/" + encodeURIComponent(task.id) }));
        tr.append(ref, Kat.el("td", name), Kat.el("td", phn), Kat.el("td", KatReferral.statusText(task)), Kat.el("td", KatReferral.next(task)));
        tr.dataset.task = task.id;
        const text = [number, name, phn, KatReferral.statusText(task)].join(" ").toLowerCase();
        return { tr, text };
      });
      render();
    } catch (e) {
      status.textContent = "";
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "Your referrals could not be loaded");
    }
    document.body.dataset.loaded = "true";
  }

  search.addEventListener("input", render);
  load();
})();
