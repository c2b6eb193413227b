// What the page says: the status line, the error (the last result stays, greyed), the stale-result note, the
// busy state with the elapsed time and Cancel (of a mask; of a download the server renders), and a result's facts.

const $ = (id) => document.getElementById(id);
// Say `text` in the status line, above the lines of what still runs (see startJob).
export function setStatus(text) {
  $("said").textContent = text;
  $("said").hidden = !text;
}

let actionFailed = false; // the error shown is that of an action on the result (showActionError)

// Show an error; when a result is shown (`kept`), it stays visible, greyed.
export function showError(text, kept) {
  sayError(text, kept ? "Failed: the last result is kept below, greyed." : "Failed: see the message below.");
  $("stage").classList.toggle("stale", kept);
}

// Show the error of an action on the shown result (a download, a copy): the result still holds, so it stays as
// it is, not greyed; the error goes once such an action works (`actionDone`).
export function showActionError(text) {
  sayError(text, "Failed: see the message below. The result shown still holds.");
  actionFailed = true;
}

export function actionDone() {
  if (actionFailed) clearError();
}

function sayError(text, status) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
  setStatus(status);
  actionFailed = false;
}

export function clearError() {
  actionFailed = false;
  $("error").hidden = true;
  $("error").textContent = "";
  $("stage").classList.toggle("stale", !$("stale-note").hidden);
}

export function setStale(text) {
  const note = $("stale-note");
  note.hidden = !text;
  note.textContent = text || "";
  $("stage").classList.toggle("stale", Boolean(text) || !$("error").hidden);
}

// job: {started (performance.now()), loading (the model is not loaded yet)} while a request runs; null after.
export function setBusy(job) {
  // Busy: what a result replaces (the image, the targets found), not the whole section: a screen reader may hold
  // back what the status line and the error alert in it announce while a region around them is busy.
  for (const id of ["stage", "instances-box"]) $(id).setAttribute("aria-busy", String(Boolean(job)));
  // Cancel pressed with the keyboard (or the request done while it has the focus): the focus goes to the button
  // beside it, not, with Cancel hidden, to the page's top, losing the user's place.
  if (!job && document.activeElement === $("cancel")) $("submit").focus();
  $("cancel").hidden = !job;
  $("submit").textContent = job ? "Working…" : "Make mask"; // pressed again, it asks anew only for changed options
  if (!job) return endJob("mask");
  const note = job.loading ? " Loading the model on the server (its first request)…" : "";
  startJob("mask", "Working…", job.started, note);
}

// A download the server renders began ({what: "cut-out"|"preview", started, button: the id of its button}): its
// own line, with its elapsed time, in the status line, and the Cancel beside the downloads.
export function fetchStarted(job) {
  const why = " (this page cannot reproduce this image's pixels exactly)…";
  startJob(job, `Asking the server for the ${job.what}${why}`, job.started);
  $("dl-cancel").hidden = false;
}

// The download `job` ended; `more`: others still run. Cancel, hidden with the last, leaves the focus on the
// download's button, or, that disabled (another image chosen since), on the image: not on the page's top.
export function fetchEnded(job, more) {
  endJob(job);
  const cancel = $("dl-cancel");
  if (more) return;
  if (document.activeElement === cancel) ($(job.button).disabled ? $("viewport") : $(job.button)).focus();
  cancel.hidden = true;
}

const jobs = new Map(); // what runs ("mask", or a download's job) -> {node: its line in the status, ticker}

// Show `text`, the seconds since `started` (performance.now()) and `note` on a line of its own in the status line,
// under what was said last and above what began before (Esc stops the topmost), until `endJob(key)`. The status is
// a live region: a line added is read out, one removed is not, and the seconds, ticking ten times a second, are for
// the eye only (aria-hidden), or a screen reader would read them out without end.
function startJob(key, text, started, note = "") {
  endJob(key);
  setStatus(""); // what was said last was of what went before
  const seconds = document.createElement("span");
  seconds.setAttribute("aria-hidden", "true");
  const node = document.createElement("span");
  node.className = "job";
  node.append(text, seconds, note);
  $("said").after(node);
  const tick = () => {
    seconds.textContent = ` ${((performance.now() - started) / 1000).toFixed(1)} s.`;
  };
  tick();
  jobs.set(key, { node, ticker: setInterval(tick, 100) });
}

function endJob(key) {
  const job = jobs.get(key);
  if (!job) return;
  clearInterval(job.ticker);
  job.node.remove();
  jobs.delete(key);
}

export function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function setFacts(r, server) {
  const options = Object.entries(r.opts).filter(([k]) => k !== "prompt");
  const rows = [
    ["Size", `${r.width}×${r.height}`],
    ["Request", r.fromCache ? "none (shown from memory)" : `${formatMs(r.ms)}${server}`],
    ["Model", [r.data.model, r.data.backend].filter(Boolean).join(" · ")],
    ["Options", options.map(([k, v]) => `${k}=${v}`).join(", ")],
  ];
  $("facts").replaceChildren(
    ...rows.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = term;
      dd.textContent = value;
      return [dt, dd];
    }),
  );
}
