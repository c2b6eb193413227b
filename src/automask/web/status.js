// What the page says: the status line, the error (the last result stays, greyed), the stale-result note, the
// busy state with the elapsed time and Cancel (of a mask; of a download the server renders), and a result's facts.

const $ = (id) => document.getElementById(id);
let ticker = 0;

export function setStatus(text) {
  $("status").textContent = text;
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
  clearInterval(ticker);
  $("result").setAttribute("aria-busy", String(Boolean(job)));
  // Cancel pressed with the keyboard (or the request done while it has the focus): the focus goes to the button
  // beside it, not, with Cancel hidden, to the page's top, losing the user's place.
  if (!job && document.activeElement === $("cancel")) $("submit").focus();
  $("cancel").hidden = !job;
  $("submit").textContent = job ? "Working…" : "Make mask"; // pressed again, it asks anew only for changed options
  if (!job) return;
  const note = job.loading ? " Loading the model on the server (its first request)…" : "";
  ticker = ticking("Working…", job.started, note);
}

let fetching = { ticker: 0, button: null };

// A download the server renders, running ({what: "cut-out"|"preview", started, button: the id of its button}), or
// none (null): its elapsed time in the status line, and the Cancel beside the downloads.
export function setFetching(job) {
  clearInterval(fetching.ticker);
  const cancel = $("dl-cancel");
  if (!job && document.activeElement === cancel && fetching.button) $(fetching.button).focus();
  cancel.hidden = !job;
  if (!job) return;
  const why = " (this page cannot reproduce this image's pixels exactly)…";
  fetching = { ticker: ticking(`Asking the server for the ${job.what}${why}`, job.started), button: job.button };
}

// Show `text`, the seconds since `started` (performance.now()) and `note` in the status line; returns the interval
// that ticks the seconds. The status is a live region, read out on each change: the seconds, ticking ten times a
// second, are for the eye only (aria-hidden), or a screen reader would read them out without end.
function ticking(text, started, note = "") {
  const seconds = document.createElement("span");
  seconds.setAttribute("aria-hidden", "true");
  $("status").replaceChildren(text, seconds, note);
  const tick = () => {
    seconds.textContent = ` ${((performance.now() - started) / 1000).toFixed(1)} s.`;
  };
  tick();
  return setInterval(tick, 100);
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
