// Conveyor dashboard: renders the view the URL fragment names from the operator's JSON API.
// Plain DOM, no framework; every text goes in through textContent, never as HTML.
"use strict";

const view = () => document.getElementById("view");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const shown = (value) => (value === undefined || value === null || value === "" ? "–" : String(value));
const part = encodeURIComponent;

async function api(path, options) {
  const response = await fetch(path, options);
  let body;
  try {
    body = await response.json();
  } catch (_) {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function notice(text, isError) {
  return el("div", { class: isError ? "notice error" : "notice", role: isError ? "alert" : "status" }, text);
}

function conditions(list) {
  return (list || []).map((c) => {
    // A condition that is True and good, or False and bad, reads at a glance.
    const goodWhenTrue = c.type === "Ready" || c.type === "Available";
    const good = (c.status === "True") === goodWhenTrue;
    return el("span", { class: good ? "cond good" : "cond bad", title: `${c.reason}: ${c.message}` },
      `${c.type}=${c.status}${c.reason ? " (" + c.reason + ")" : ""}`);
  });
}

// Replaces the children of `node`; arrays are flattened and absent parts left out.
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null));
}

function render(...nodes) {
  fill(view(), ...nodes);
}

function queueLink(q) {
  return el("a", { href: `#/queue/${part(q.namespace)}/${part(q.name)}` }, `${q.namespace}/${q.name}`);
}

async function queuesView(params) {
  const after = params.get("after");
  const page = await api("/api/queues" + (after ? `?after=${part(after)}` : ""));
  const rows = page.items.map((q) =>
    el("tr", { "data-queue": `${q.namespace}/${q.name}` },
      el("td", {}, queueLink(q)),
      el("td", { class: "num", "data-field": "pending" }, shown(q.pending)),
      el("td", { class: "num", "data-field": "inFlight" }, shown(q.inFlight)),
      el("td", { class: "num", "data-field": "delayed" }, shown(q.delayed)),
      el("td", { class: "num", "data-field": "waiting" }, shown(q.waiting)),
      el("td", { class: "num", "data-field": "deadLettered" },
        el("a", { href: `#/dead-letters/${part(q.namespace)}/${part(q.name)}` }, shown(q.deadLettered))),
      el("td", { "data-field": "oldestPendingAge" }, shown(q.oldestPendingAge)),
      el("td", { class: "num" }, shown(q.submittedPerSecond)),
      el("td", { class: "num" }, shown(q.finishedPerSecond)),
      el("td", {}, conditions(q.conditions))));
  render(
    el("h1", {}, `Queues (${page.total})`),
    el("table", { id: "queues" },
      el("thead", {}, el("tr", {}, ["Queue", "Pending", "In flight", "Delayed", "Waiting", "Dead letters",
        "Oldest pending", "Submitted/s", "Finished/s", "Conditions"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    page.items.length === 0 ? notice("No JobQueue yet.") : null,
    page.next ? el("p", {}, el("a", { href: `#/queues?after=${part(page.next)}` }, "Next page")) : null);
}

const SVG = "http://www.w3.org/2000/svg";

// A small line chart of `series` (arrays of numbers, one per line) over the same points.
function sparkline(id, title, series, classes) {
  const width = 320, height = 60;
  const values = series.flat();
  const top = Math.max(1, ...values);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("id", id);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  series.forEach((line, n) => {
    const step = line.length > 1 ? width / (line.length - 1) : 0;
    const points = line.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`);
    if (points.length === 1) points.push(`${width},${points[0].split(",")[1]}`);
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", points.join(" "));
    polyline.setAttribute("class", classes[n]);
    svg.append(polyline);
  });
  return el("figure", {}, svg, el("figcaption", {}, `${title} (max ${top})`));
}

function charts(history) {
  const points = history.points;
  if (points.length === 0) return el("p", { class: "muted", id: "charts" }, `No sample yet (one every ${history.intervalSeconds} s).`);
  const of = (field) => points.map((p) => p[field]);
  const minutes = Math.round((points[points.length - 1].t - points[0].t) / 60);
  return el("div", { id: "charts", "data-points": points.length },
    el("p", { class: "muted" }, `Last ${minutes} min, one sample every ${history.intervalSeconds} s.`),
    sparkline("chart-backlog", "Pending and in flight", [of("pending"), of("inFlight")], ["line-a", "line-b"]),
    sparkline("chart-rates", "Submitted/s and finished/s", [of("submittedPerSecond"), of("finishedPerSecond")], ["line-a", "line-b"]),
    sparkline("chart-dead", "Dead letters", [of("deadLettered")], ["line-bad"]));
}

async function queueView(namespace, name) {
  const q = await api(`/api/queues/${part(namespace)}/${part(name)}`);
  const history = await api(`/api/queues/${part(namespace)}/${part(name)}/history`);
  const figures = [["Pending", q.pending], ["In flight", q.inFlight], ["Delayed", q.delayed],
    ["Waiting (dependencies)", q.waiting], ["Dead letters", q.deadLettered], ["Awaiting dead letter", q.awaitingDeadLetter],
    ["Oldest pending", q.oldestPendingAge], ["Submitted/s", q.submittedPerSecond],
    ["Finished/s", q.finishedPerSecond], ["Priority levels", q.priorities], ["Read at", q.observedAt]];
  render(
    el("h1", {}, `Queue ${namespace}/${name}`),
    el("dl", { id: "figures" }, figures.map(([k, v]) => [el("dt", {}, k), el("dd", {}, shown(v))])),
    el("p", {}, conditions(q.conditions)),
    charts(history),
    el("p", {},
      el("a", { href: `#/dead-letters/${part(namespace)}/${part(name)}` }, "Browse dead letters"), " · ",
      el("a", { href: `#/pending/${part(namespace)}/${part(name)}` }, "Peek pending jobs"), " · ",
      el("a", { href: `#/delayed/${part(namespace)}/${part(name)}` }, "Delayed jobs"), " · ",
      el("a", { href: `#/job?queue=${part(namespace + "/" + name)}` }, "Find a job")),
    el("h2", {}, "Recent failures"),
    q.recentFailures.length === 0 ? el("p", { class: "muted" }, "None.") :
      el("table", {},
        el("thead", {}, el("tr", {}, ["Job", "Reason", "Attempts", "Error", "Pod", "When"].map((h) => el("th", {}, h)))),
        el("tbody", {}, q.recentFailures.map((f) => el("tr", {},
          el("td", {}, f.jobId), el("td", {}, f.reason), el("td", { class: "num" }, shown(f.attempts)),
          el("td", {}, f.error), el("td", {}, f.pod), el("td", {}, shown(f.time)))))));
}

async function workersView(params) {
  const after = params.get("after");
  const page = await api("/api/workers" + (after ? `?after=${part(after)}` : ""));
  const rows = page.items.map((w) =>
    el("tr", { "data-worker": `${w.namespace}/${w.name}` },
      el("td", {}, `${w.namespace}/${w.name}`),
      el("td", {}, el("a", { href: `#/queue/${part(w.namespace)}/${part(w.queue)}` }, w.queue)),
      el("td", { class: "num", "data-field": "replicas" }, `${w.readyReplicas}/${shown(w.desiredReplicas)}`),
      el("td", { class: "num", "data-field": "busy" }, `${shown(w.busy)}/${shown(w.slots)}`),
      el("td", { class: "num" }, w.recycledPods),
      el("td", { class: w.troubles ? "error" : "muted" }, w.troubles || "none"),
      el("td", {}, conditions(w.conditions))));
  render(
    el("h1", {}, `Workers (${page.total})`),
    el("table", { id: "workers" },
      el("thead", {}, el("tr", {}, ["Worker", "Queue", "Ready/desired", "Busy/slots", "Recycled",
        "Crashes", "Conditions"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    page.items.length === 0 ? notice("No Worker yet.") : null,
    page.next ? el("p", {}, el("a", { href: `#/workers?after=${part(page.next)}` }, "Next page")) : null);
}

async function deadLettersView(namespace, name, params) {
  const from = params.get("from");
  const base = `/api/queues/${part(namespace)}/${part(name)}/dead-letters`;
  const page = await api(base + (from ? `?from=${part(from)}` : ""));
  const rows = page.items.map((d) =>
    el("tr", { "data-job": d.jobId },
      el("td", { class: "num" },
        el("a", { href: `#/dead-letter/${part(namespace)}/${part(name)}/${d.sequence}` }, d.sequence)),
      el("td", {}, d.jobId), el("td", {}, d.reason), el("td", { class: "num" }, shown(d.attempts)),
      el("td", {}, d.error), el("td", {}, d.pod), el("td", {}, d.failedAt)));
  const outcome = el("div", { id: "bulk-outcome" });
  const match = el("input", { id: "bulk-match", placeholder: "error or reason contains … (empty: all)" });
  const bulk = (action) => () => bulkAction(namespace, name, action, match.value.trim(), outcome);
  render(
    el("h1", {}, `Dead letters of ${namespace}/${name}`),
    el("p", { class: "find" }, match,
      el("button", { id: "bulk-requeue", onclick: bulk("requeue") }, "Requeue matching"),
      el("button", { id: "bulk-purge", onclick: bulk("purge") }, "Purge matching")),
    outcome,
    el("table", { id: "dead-letters" },
      el("thead", {}, el("tr", {}, ["Seq", "Job", "Reason", "Attempts", "Error", "Pod", "Failed at"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    page.items.length === 0 ? notice("No dead letter" + (from ? " from here on." : ".")) : null,
    page.next ? el("p", {}, el("a", {
      href: `#/dead-letters/${part(namespace)}/${part(name)}?from=${page.next}`,
    }, "Next page")) : null);
}

function writeHeaders() {
  const token = document.getElementById("token").value;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// Requeues or purges the dead letters that match, one bounded page per request, following
// `next` until the end and showing the running count.
async function bulkAction(namespace, name, action, match, outcome) {
  let cursor = "from=0";
  let acted = 0;
  let scanned = 0;
  const base = `/api/queues/${part(namespace)}/${part(name)}/dead-letters/all/${action}`;
  const verb = action === "requeue" ? "Requeued" : "Purged";
  try {
    for (;;) {
      const done = await api(`${base}?${cursor}${match ? "&match=" + part(match) : ""}`,
        { method: "POST", headers: writeHeaders() });
      acted += done.jobs.length;
      scanned += done.scanned;
      if (done.error) {
        fill(outcome, notice(`${verb} ${acted} of ${scanned} read, then: ${done.error}`, true));
        return;
      }
      fill(outcome, notice(`${verb} ${acted} of ${scanned} read${done.next ? " …" : "."}`));
      if (!done.next) return;
      // Up to the last dead letter there was when the action started, not those it causes.
      cursor = `from=${done.next}&until=${done.until}`;
    }
  } catch (error) {
    fill(outcome, notice(`${acted} done, then: ${error.message}`, true));
  }
}

function peekTable(id, headings, rows) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

async function pendingView(namespace, name, params) {
  const q = await api(`/api/queues/${part(namespace)}/${part(name)}`);
  const level = Number(params.get("level") || 0);
  const from = params.get("from");
  const page = await api(`/api/queues/${part(namespace)}/${part(name)}/pending?level=${level}` +
    (from ? `&from=${part(from)}` : ""));
  const here = `#/pending/${part(namespace)}/${part(name)}`;
  const levels = [];
  for (let l = q.priorities - 1; l >= 0; l--) {
    levels.push(l === level ? el("strong", {}, `level ${l}`) : el("a", { href: `${here}?level=${l}` }, `level ${l}`), " ");
  }
  const rows = page.items.map((j) =>
    el("tr", { "data-job": j.jobId },
      el("td", { class: "num" }, j.sequence), el("td", {}, j.jobId), el("td", { class: "num" }, j.size),
      el("td", {}, j.storedAt),
      el("td", { "data-field": "state" }, j.delivered ? "delivered (running or retrying)" : "waiting for a worker"),
      el("td", { class: j.malformed ? "error" : "muted" }, j.malformed || "–")));
  render(
    el("h1", {}, `Pending jobs of ${namespace}/${name}`),
    el("p", {}, "Priority: ", levels, el("span", { class: "muted" }, ` (${shown(q.pending)} pending in all levels)`)),
    peekTable("pending", ["Seq", "Job", "Bytes", "Stored at", "State", "Malformed"], rows),
    page.items.length === 0 ? notice("No pending job at this level" + (from ? " from here on." : ".")) : null,
    page.next ? el("p", {}, el("a", { href: `${here}?level=${level}&from=${page.next}` }, "Next page")) : null);
}

async function delayedView(namespace, name, params) {
  const from = params.get("from");
  const page = await api(`/api/queues/${part(namespace)}/${part(name)}/delayed` + (from ? `?from=${part(from)}` : ""));
  const rows = page.items.map((j) =>
    el("tr", { "data-job": j.jobId },
      el("td", { class: "num" }, j.sequence), el("td", {}, j.jobId), el("td", { "data-field": "runAt" }, shown(j.runAt)),
      el("td", { class: "num" }, j.size), el("td", {}, j.storedAt)));
  render(
    el("h1", {}, `Delayed jobs of ${namespace}/${name}`),
    peekTable("delayed", ["Seq", "Job", "Runs at", "Bytes", "Submitted at"], rows),
    page.items.length === 0 ? notice("No delayed job" + (from ? " from here on." : ".")) : null,
    page.next ? el("p", {}, el("a", { href: `#/delayed/${part(namespace)}/${part(name)}?from=${page.next}` }, "Next page")) : null);
}

function payload(bytes) {
  const cut = bytes.truncated ? ` (first ${bytes.text !== undefined ? bytes.text.length : "64 KiB"} shown)` : "";
  return [
    el("p", { class: "muted" }, `${bytes.size} bytes${bytes.base64 !== undefined ? ", binary, base64" : ""}${cut}`),
    el("pre", { id: "payload" }, bytes.text !== undefined ? bytes.text : bytes.base64),
  ];
}

async function deadLetterView(namespace, name, sequence) {
  const d = await api(`/api/queues/${part(namespace)}/${part(name)}/dead-letters/${part(sequence)}`);
  const info = await api("/api/info");
  const outcome = el("div", { id: "outcome" });
  const act = (action) => async () => {
    try {
      const done = await api(`/api/queues/${part(namespace)}/${part(name)}/dead-letters/${part(sequence)}/${action}`,
        { method: "POST", headers: writeHeaders() });
      fill(outcome, notice(`${done.action === "requeue" ? "Requeued" : "Purged"}: ${done.jobs.join(", ")}`));
    } catch (error) {
      fill(outcome, notice(error.message, true));
    }
  };
  const fields = [["Job", d.jobId], ["Reason", d.reason], ["Attempts", d.attempts], ["Error", d.error],
    ["Pod", d.pod], ["Failed at", d.failedAt], ["Subject", d.subject], ["Sequence", d.sequence]];
  render(
    el("h1", {}, `Dead letter ${d.jobId}`),
    el("dl", { id: "dead-letter" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, shown(v))])),
    el("p", {},
      el("button", { id: "requeue", onclick: act("requeue") }, "Requeue"),
      el("button", { id: "purge", onclick: act("purge") }, "Purge"),
      info.writable ? null : el("span", { class: "muted" }, "read-only: the operator has no dashboard token")),
    outcome,
    el("h2", {}, "Payload"), payload(d.payload),
    el("h2", {}, "Headers"),
    el("table", { id: "headers" }, el("tbody", {}, d.headers.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))))));
}

async function jobView(params) {
  const queue = params.get("queue") || "";
  const id = params.get("id") || "";
  const form = el("form", { class: "find", id: "find" },
    el("input", { name: "queue", placeholder: "namespace/queue", value: queue, required: "" }),
    el("input", { name: "id", placeholder: "job id", value: id, required: "" }),
    el("button", { type: "submit" }, "Find"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    location.hash = `#/job?queue=${part(data.get("queue").trim())}&id=${part(data.get("id").trim())}`;
  });
  render(el("h1", {}, "Where is job …"), form, el("div", { id: "answer" }));
  if (!queue || !id) return;
  const [namespace, name] = queue.split("/");
  const answer = document.getElementById("answer");
  try {
    const found = await api(`/api/queues/${part(namespace)}/${part(name || "")}/jobs/${part(id)}`);
    const says = {
      completed: "completed",
      deadLettered: "dead-lettered",
      cancelled: "cancelled",
      delayed: "delayed",
      notFound: "not found in the places looked",
    }[found.state];
    fill(answer,
      el("p", { id: "job-state", "data-state": found.state }, `Job ${found.id}: ${says}`),
      found.delayedUntil ? el("p", {}, `Scheduled: ${found.delayedUntil}`) : null,
      found.error !== undefined ? el("p", { class: "error" }, `${found.reason} after ${found.attempts} attempts: ${found.error}`) : null,
      found.result ? [el("h2", {}, "Result"), payload(found.result)] : null,
      el("h2", {}, "Looked at"),
      el("ul", {}, found.checked.map((c) => el("li", {}, c))),
      el("p", { class: "muted" }, `Not looked at: ${found.notChecked}`));
  } catch (error) {
    fill(answer, notice(error.message, true));
  }
}

async function route() {
  const [path, query] = (location.hash.replace(/^#/, "") || "/queues").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.view === parts[0]);
  }
  try {
    switch (parts[0]) {
      case "workers": return await workersView(params);
      case "queue": return await queueView(parts[1], parts[2]);
      case "dead-letters": return await deadLettersView(parts[1], parts[2], params);
      case "dead-letter": return await deadLetterView(parts[1], parts[2], parts[3]);
      case "pending": return await pendingView(parts[1], parts[2], params);
      case "delayed": return await delayedView(parts[1], parts[2], params);
      case "job": return await jobView(params);
      default: return await queuesView(params);
    }
  } catch (error) {
    render(notice(error.message, true));
  }
}

async function start() {
  const token = document.getElementById("token");
  token.value = sessionStorage.getItem("conveyor-token") || "";
  token.addEventListener("change", () => sessionStorage.setItem("conveyor-token", token.value));
  try {
    const info = await api("/api/info");
    document.getElementById("mode").textContent =
      `${info.writable ? "writes need the token" : "read-only"} · v${info.version}`;
  } catch (error) {
    document.getElementById("mode").textContent = error.message;
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
