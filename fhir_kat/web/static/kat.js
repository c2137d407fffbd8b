/* Shared helpers of the fhir_kat pages: API calls with the browser session, readable errors
   from OperationOutcomes, and a small JSON Schema checker for inline validation.
   Hand-written, no dependencies; everything is written to the page as text, never as HTML. */
"use strict";
window.Kat = (function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  class ApiError extends Error {
    constructor(status, messages) {
      super(messages.map((m) => m.text).join("; "));
      this.status = status;
      this.messages = messages;
    }
  }

  function outcomeMessages(status, body) {
    if (body && body.resourceType === "OperationOutcome" && Array.isArray(body.issue)) {
      return body.issue.map((i) => ({
        text: i.diagnostics || (i.details && i.details.text) || i.code || "error",
        expression: (i.expression || [])[0] || "",
      }));
    }
    if (status === 401) return [{ text: "Your session has ended: sign in again.", expression: "" }];
    return [{ text: "The service answered with HTTP " + status + ".", expression: "" }];
  }

  async function api(method, url, body) {
    const headers = { Accept: "application/fhir+json, application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) headers["Content-Type"] = url.startsWith("/fhir") ? "application/fhir+json" : "application/json";
    let response;
    try {
      response = await fetch(url, {
        method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, [{ text: "The service could not be reached. Check your connection and try again.", expression: "" }]);
    }
    let parsed = null;
    try { parsed = await response.json(); } catch (e) { parsed = null; }
    if (!response.ok) {
      const messages = outcomeMessages(response.status, parsed);
      if (response.status === 401) messages.push({ text: "", expression: "", login: true });
      throw new ApiError(response.status, messages);
    }
    return parsed;
  }

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  /* Fill an error summary (role=alert) with one line per problem; a problem naming a form field
     links to it. */
  function showErrors(summary, messages, heading) {
    summary.replaceChildren(el("h2", heading || "There is a problem"));
    const list = el("ul");
    for (const m of messages) {
      if (m.login) {
        const li = el("li");
        li.append(el("a", "Sign in again", { href: "/app/login?next=" + encodeURIComponent(location.pathname) }));
        list.append(li);
        continue;
      }
      const li = el("li");
      const target = m.field || null;
      if (target) {
        const a = el("a", m.text, { href: "#" + target.id });
        a.addEventListener("click", (ev) => { ev.preventDefault(); focusField(target); });
        li.append(a);
      } else {
        li.textContent = m.text;
      }
      list.append(li);
    }
    summary.append(list);
    summary.hidden = false;
    summary.focus();
  }

  function clearErrors(summary) { summary.hidden = true; summary.replaceChildren(); }

  function focusField(node) {
    const input = node.matches("input, select, textarea") ? node : node.querySelector("input, select, textarea");
    (input || node).focus();
  }

  /* ---- a JSON Schema (2020-12) subset: type, required, properties, items, enum, pattern,
     minLength, maxLength, format (date, date-time, email, uri). Enough for the artifact
     schemas this service publishes; the server validates again in any case. */
  const FORMATS = {
    date: [/^\d{4}-\d{2}-\d{2}$/, "a date (YYYY-MM-DD)"],
    "date-time": [/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$/, "a date and time"],
    email: [/^[^@\s]+@[^@\s]+\.[^@\s]+$/, "an email address"],
    uri: [/^[A-Za-z][A-Za-z0-9+.-]*:\S+$/, "a URI (for example https://…)"],
  };

  function typeOf(v) {
    if (v === null) return "null";
    if (Array.isArray(v)) return "array";
    if (Number.isInteger(v)) return "integer";
    return typeof v;
  }

  function validate(schema, value, path, out) {
    out = out || [];
    path = path || "";
    const types = schema.type === undefined ? [] : [].concat(schema.type);
    if (types.length && !types.includes(typeOf(value)) && !(types.includes("number") && typeof value === "number")) {
      out.push({ path, text: "must be " + types.join(" or ") });
      return out;
    }
    if (schema.enum && !schema.enum.includes(value)) out.push({ path, text: "choose one of the offered values" });
    if (typeof value === "string") {
      if (schema.minLength !== undefined && value.length < schema.minLength) out.push({ path, text: schema.minLength === 1 ? "must not be empty" : "must be at least " + schema.minLength + " characters" });
      if (schema.maxLength !== undefined && value.length > schema.maxLength) out.push({ path, text: "must be at most " + schema.maxLength + " characters" });
      if (schema.pattern && !new RegExp(schema.pattern).test(value)) out.push({ path, text: "is not in the expected format" });
      const format = FORMATS[schema.format];
      if (format && !format[0].test(value)) out.push({ path, text: "must be " + format[1] });
    }
    if (typeOf(value) === "object") {
      for (const name of schema.required || []) {
        const sub = (schema.properties || {})[name] || {};
        if (value[name] === undefined) {
          if (typeOf(sub.properties) === "object" && sub.type === "object") validate(sub, {}, join(path, name), out);
          else out.push({ path: join(path, name), text: "is required" });
        }
      }
      for (const [name, sub] of Object.entries(schema.properties || {})) {
        if (value[name] !== undefined) validate(sub, value[name], join(path, name), out);
      }
    }
    if (Array.isArray(value) && schema.items) value.forEach((v, i) => validate(schema.items, v, path + "[" + i + "]", out));
    return out;
  }

  function join(path, name) { return path ? path + "." + name : name; }

  function nowWithOffset() {
    const d = new Date();
    const pad = (n) => String(Math.abs(n)).padStart(2, "0");
    const off = -d.getTimezoneOffset();
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" +
      pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + (off >= 0 ? "+" : "-") + pad(Math.trunc(off / 60)) + ":" + pad(off % 60);
  }

  function codingText(concept) {
    if (!concept) return "";
    if (concept.text) return concept.text;
    const c = (concept.coding || [])[0];
    return c ? (c.display || c.code || "") : "";
  }

  /* A search's entries, following its "next" links: at most maxPages pages (a bound, so a
     page never loops). Everything comes from the API with this session's permissions. */
  async function searchAll(url, maxPages) {
    const out = [];
    let next = url;
    for (let page = 0; next && page < (maxPages || 10); page += 1) {
      const bundle = await api("GET", next);
      out.push(...(bundle.entry || []));
      const link = (bundle.link || []).find((l) => l.relation === "next");
      next = link ? link.url.replace(/^https?:\/\/[^/]+/, "") : "";
    }
    return out;
  }

  // The PHN systems the service accepts (artifacts.schemas.PHN_SYSTEMS, given by the page).
  /* A search's _include'd Patients by reference ("Patient/<id>"), and its matches. */
  function split(entries, type) {
    const patients = new Map();
    for (const e of entries) if (e.resource.resourceType === "Patient") patients.set("Patient/" + e.resource.id, e.resource);
    return { patients, matches: entries.map((e) => e.resource).filter((r) => r.resourceType === type) };
  }

  const PHN_SYSTEMS = (document.body.dataset.phnSystems || "").split(" ").filter(Boolean);

  function patientName(patient) {
    const name = ((patient || {}).name || [])[0];
    if (!name) return "";
    if (name.text) return name.text;
    return [...(name.given || []), name.family || ""].join(" ").trim();
  }

  function patientPhn(patient) {
    const id = ((patient || {}).identifier || []).find((i) => PHN_SYSTEMS.includes(i.system));
    return id ? id.value : "";
  }

  /* "9 Dec 2026, 14:05" in the reader's own locale; a date alone stays a date. */
  function when(value) {
    if (!value) return "";
    const d = new Date(value);
    if (Number.isNaN(d.getTime())) return value;
    if (/^\d{4}-\d{2}-\d{2}$/.test(value)) return d.toLocaleDateString(undefined, { timeZone: "UTC", day: "numeric", month: "short", year: "numeric" });
    return d.toLocaleString(undefined, { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  return { api, ApiError, el, showErrors, clearErrors, focusField, validate, nowWithOffset, codingText, csrf,
    searchAll, split, patientName, patientPhn, when, PHN_SYSTEMS };
})();
