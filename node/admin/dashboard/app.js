// ainode dashboard: a small single-page app over /api (no build step, no external resources).
"use strict";

const view = document.getElementById("view");
// The session is an HttpOnly cookie the page never sees; every call sends this header, which a
// cross-site form cannot, so the API accepts changes made with the cookie from this page only.
const SAME_SITE = { "X-Requested-With": "ainode" };
class LoginNeeded extends Error {}
let loggedOut = false;

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options, headers: { ...SAME_SITE, ...(options.headers || {}) } });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) throw new LoginNeeded(body.detail || "log in");
  if (!res.ok) throw new Error(body.detail || JSON.stringify(body.errors || body) || res.statusText);
  return body;
}

function showLogin(message) {
  loggedOut = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("whoami").textContent = "";
  view.innerHTML = `<section id="login"><h2>Log in</h2><p>${esc(message)}</p>
    <form id="login-form"><label>User <input id="user" autocomplete="username"></label>
    <label>Password <input id="password" type="password" autocomplete="current-password"></label>
    <button type="submit">Log in</button></form>
    <p class="hint">Users are <code>api.users</code> in the configuration. An administrator may leave the user empty
    and give the API token (<code>api.token</code>, or the file <code>api-token</code> in the storage folder) as password.</p></section>`;
  document.getElementById("login-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const name = document.getElementById("user").value.trim();
    const secret = document.getElementById("password").value;
    // The password goes once to the node, which answers with an HttpOnly session cookie:
    // the page keeps no credential (no localStorage, no variable outliving this call).
    const credentials = name
      ? { headers: { ...SAME_SITE, "Content-Type": "application/json" }, body: JSON.stringify({ name, password: secret }) }
      : { headers: { ...SAME_SITE, "Authorization": "Bearer " + secret.trim() } };
    const res = await fetch("/api/session", { method: "POST", credentials: "same-origin", ...credentials });
    if (res.ok) { loggedOut = false; route(); }
    else showLogin("Refused: " + ((await res.json().catch(() => ({}))).detail || res.statusText));
  });
}

async function logout() {
  await fetch("/api/session", { method: "DELETE", credentials: "same-origin", headers: SAME_SITE });
  showLogin("Logged out.");
}

// The role decides what the page offers: a viewer sees no button that changes something (the
// API refuses such changes anyway, with 403).
async function whoami() {
  const me = await api("/api/session");
  document.getElementById("whoami").textContent = `${me.user} (${me.role})`;
  document.body.classList.toggle("viewer", me.role !== "admin");
  return me;
}

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
// "inapplicable" jobs read "not applicable" (outside the analysis' intended use).
function badge(s) { const shown = s === "inapplicable" ? "not applicable" : s; return `<span class="badge ${esc(s).replace(/ /g, "-")}">${esc(shown)}</span>`; }
function secs(v) { return v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " s"; }
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(1) + " " + u[i];
}
function table(cols, rows) {
  return `<table><tr>${cols.map(c => `<th>${esc(c)}</th>`).join("")}</tr>${rows.join("") || `<tr><td colspan="${cols.length}">none</td></tr>`}</table>`;
}
const STAGES = ["receiving", "completion", "routing", "queue_wait", "analysis", "delivery", "total"];

async function overview() {
  const [o, studies] = await Promise.all([api("/api/overview"), api("/api/studies?limit=50")]);
  document.getElementById("node-name").textContent = `${o.node.ae_title} · port ${o.node.port} · broker ${o.node.broker}`;
  const flow = ["received", "ready", "queued", "running", "delivered", "done", "not applicable", "partial", "failed", "unrouted"]
    .map(p => `<div class="phase ${p}" id="phase-${p}"><b>${o.phases[p] || 0}</b>${p}</div>`).join("");
  const rows = studies.map(s => `<tr class="study-row" data-phase="${esc(s.phase)}">
      <td><a href="#/study/${encodeURIComponent(s.study_uid)}">${esc(s.description || s.study_uid)}</a></td>
      <td>${esc(s.modalities.join(","))}</td><td>${s.instances}</td><td>${badge(s.phase)}</td>
      <td>${esc(s.rules_matched.join(", "))}</td>
      ${STAGES.map(k => `<td>${secs(s.timings_s[k])}</td>`).join("")}
      <td class="error">${esc(s.failures.join("; "))}</td></tr>`);
  const disk = o.disk;
  view.innerHTML = `
    <section><h2>Pipeline (last 200 studies)</h2><div class="pipeline">${flow}</div></section>
    <section><h2>Queue depth</h2>${table(["stat", "routine", "low"], [`<tr id="queue-depth"><td>${o.queue_depth.stat}</td><td>${o.queue_depth.routine}</td><td>${o.queue_depth.low}</td></tr>`])}</section>
    <section><h2>Studies</h2>${table(["Study", "Modality", "Instances", "Phase", "Rules", ...STAGES, "Failure"], rows)}</section>
    <section><h2>Failures</h2>${table(["Study", "Reasons"], o.failures.map(f => `<tr><td>${esc(f.study_uid)}</td><td class="error">${esc(f.reasons.join("; "))}</td></tr>`))}</section>
    <section><h2>Storage</h2><p id="disk">${bytes(disk.free_bytes)} free of ${bytes(disk.total_bytes)} (reserve ${bytes(disk.reserve_bytes)}) · ${o.index.studies} studies, ${o.index.instances} instances, ${bytes(o.index.bytes)}</p></section>`;
}

async function study(uid) {
  const s = await api("/api/studies/" + encodeURIComponent(uid));
  const jobs = s.jobs.map(j => `<tr><td>${j.id}</td><td>${esc(j.rule)}</td><td>${esc(j.analysis)}</td><td>${badge(j.state)}</td>
      <td>${j.attempts}/${j.max_attempts}</td><td>${esc(j.worker)}</td><td>${esc(j.model_version)}</td><td class="error">${esc(j.error)}</td>
      <td><button class="change" data-act="rerun" data-id="${j.id}">Re-run</button>${["dead", "failed"].includes(j.state) ? ` <button class="change" data-act="retry" data-id="${j.id}">Retry</button>` : ""}</td></tr>`);
  const dels = s.deliveries.map(d => `<tr><td>${d.id}</td><td>${esc(d.destination)}</td><td>${esc(d.kind)}</td><td>${badge(d.state)}</td>
      <td>${d.retries}</td><td>${esc(d.last_status)}</td><td class="error">${esc(d.reason)}</td></tr>`);
  const values = s.jobs.flatMap(j => [
    ...(j.findings.classifications || []).map(c => `<tr class="finding"><td>${j.id}</td><td>${esc(j.analysis)}</td><td>${esc(c.finding || c.label)}</td>
      <td class="value">p = ${c.probability.toFixed(3)}</td><td>${c.present ? "present" : "absent"}</td></tr>`),
    ...(j.findings.measurements || []).map(m => `<tr class="finding"><td>${j.id}</td><td>${esc(j.analysis)}</td><td>${esc(m.name)}${m.label ? " (" + esc(m.label) + ")" : ""}</td>
      <td class="value">${Number(m.value).toFixed(1)} ${esc(m.unit)}</td><td></td></tr>`),
  ]);
  const slices = s.key_slices.map(k => `<figure><img class="key-slice" alt="slice ${k}" src="/api/studies/${encodeURIComponent(uid)}/slices/${k}.png"><figcaption>slice ${k}</figcaption></figure>`);
  view.innerHTML = `
    <section><h2>Study ${esc(s.description || "")} ${badge(s.phase)}</h2><p>${esc(s.study_uid)} · ${s.instances} instances from ${esc(s.calling_ae)} · ready: ${esc(s.ready_reason)}</p>
      ${table(STAGES, [`<tr id="timings">${STAGES.map(k => `<td>${secs(s.timings_s[k])}</td>`).join("")}</tr>`])}</section>
    <section><h2>Results</h2>${table(["Job", "Analysis", "Finding", "Value", ""], values)}</section>
    <section><h2>Key slices</h2><div class="slices">${slices.join("") || "no images"}</div></section>
    <section><h2>Jobs</h2>${table(["#", "Rule", "Analysis", "State", "Attempts", "Worker", "Model", "Error", ""], jobs)}</section>
    <section><h2>Deliveries</h2>${table(["#", "Destination", "Object", "State", "Retries", "Status", "Reason"], dels)}
      <button class="change" id="resend">Re-send results</button></section>`;
  view.querySelectorAll("button[data-act]").forEach(b => b.addEventListener("click", () => action(`/api/jobs/${b.dataset.id}/${b.dataset.act}`)));
  document.getElementById("resend").addEventListener("click", () => action(`/api/studies/${encodeURIComponent(uid)}/resend`));
}

async function action(path) {
  try { await api(path, { method: "POST" }); route(); }
  catch (e) { document.getElementById("status").textContent = "Refused: " + e.message; }
}

async function jobs() {
  const rows = (await api("/api/jobs")).map(j => `<tr><td>${j.id}</td>
      <td><a href="#/study/${encodeURIComponent(j.study_uid)}">${esc(j.study_uid)}</a>${j.series_uid ? `<br><small>series ${esc(j.series_uid)}</small>` : ""}</td><td>${esc(j.analysis)}</td><td>${esc(j.priority)}</td><td>${badge(j.state)}</td>
      <td>${j.attempts}</td><td>${esc(j.worker)}</td><td class="error">${esc(j.error)}</td></tr>`);
  view.innerHTML = `<section><h2>Jobs</h2>${table(["#", "Study", "Analysis", "Priority", "State", "Attempts", "Worker", "Error"], rows)}</section>`;
}

async function deliveries() {
  const rows = (await api("/api/deliveries")).map(d => `<tr><td>${d.id}</td><td>${esc(d.destination)}</td><td>${esc(d.kind)}</td>
      <td>${badge(d.state)}</td><td>${d.retries}</td><td class="error">${esc(d.reason)}</td></tr>`);
  view.innerHTML = `<section><h2>Deliveries</h2>${table(["#", "Destination", "Object", "State", "Retries", "Reason"], rows)}</section>`;
}

async function destinations() {
  const [dests, peers] = await Promise.all([api("/api/destinations"), api("/api/peers")]);
  const rows = dests.map(d => `<tr><td>${esc(d.name)}</td><td>${esc(d.ae_title || d.url)}</td><td>${esc(d.host || "")}:${esc(d.port || "")}</td>
      <td>${esc(d.last_contact || "never")}</td><td class="error">${esc(d.last_error)}</td>
      <td><button class="change" data-echo="${esc(d.name)}">C-ECHO</button> <span id="echo-${esc(d.name)}"></span></td></tr>`);
  const prow = peers.map(p => `<tr><td>${esc(p.ae_title)}</td><td>${esc(p.hosts.join(", "))}</td><td>${esc(p.last_contact || "never")}</td></tr>`);
  view.innerHTML = `<section><h2>Destinations</h2>${table(["Name", "AE / URL", "Address", "Last contact", "Last error", ""], rows)}</section>
    <section><h2>Peers</h2>${table(["AE title", "Hosts", "Last contact"], prow)}</section>`;
  view.querySelectorAll("button[data-echo]").forEach(b => b.addEventListener("click", async () => {
    const out = document.getElementById("echo-" + b.dataset.echo);
    out.textContent = "…";
    try { const r = await api(`/api/destinations/${encodeURIComponent(b.dataset.echo)}/echo`, { method: "POST" });
      out.textContent = `${r.ok ? "OK" : "failed"}: ${r.result}${r.round_trip_ms ? ` (${r.round_trip_ms} ms)` : ""}`; }
    catch (e) { out.textContent = e.message; }
  }));
}

async function workers() {
  const w = await api("/api/workers");
  const rows = w.workers.map(x => `<tr><td>${esc(x.worker)}</td><td>${esc(x.last_heartbeat || "")}</td><td>${x.running}</td><td>${x.jobs}</td><td>${esc(x.analyses.join(", "))}</td></tr>`);
  const gpus = w.gpus.map(g => `<tr><td>${g.index}</td><td>${esc(g.name)}</td><td>${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}</td></tr>`);
  const models = w.analyses.map(a => `<tr><td>${esc(a.name)}</td><td>${esc(a.version)}</td><td>${a.weights ? "yes" : "no"}</td></tr>`);
  view.innerHTML = `<section><h2>Workers (${esc(w.mode)})</h2>${table(["Worker", "Last heartbeat", "Running", "Jobs", "Analyses"], rows)}</section>
    <section><h2>GPUs on the node machine</h2>${table(["#", "Device", "Memory"], gpus)}</section>
    <section><h2>Installed analyses</h2>${table(["Name", "Version", "Weights present"], models)}</section>`;
}

async function route() {
  const hash = location.hash || "#/";
  try {
    if (!document.getElementById("whoami").textContent) await whoami();
    if (hash.startsWith("#/study/")) await study(decodeURIComponent(hash.slice(8)));
    else if (hash === "#/jobs") await jobs();
    else if (hash === "#/deliveries") await deliveries();
    else if (hash === "#/destinations") await destinations();
    else if (hash === "#/workers") await workers();
    else await overview();
    document.getElementById("logout").hidden = false;
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof LoginNeeded) showLogin(e.message);
    else view.innerHTML = `<section class="error">Cannot load: ${esc(e.message)}</section>`;
  }
}

document.getElementById("logout").addEventListener("click", logout);
window.addEventListener("hashchange", route);
route();
// The overview refreshes itself (not behind the login form); detail pages refresh on navigation.
setInterval(() => { if (!loggedOut && (location.hash || "#/") === "#/") route(); }, 3000);
