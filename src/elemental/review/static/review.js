// The review page: one photo at a time, decided by keyboard or touch; the server's answer is the only proof
// that a decision is saved, so the page never shows one as saved before the answer came.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const TIER = ["student disagrees", "teacher unsure", ""];
const $ = (id) => document.getElementById(id);

const view = {
  state: null,        // /api/state's answer; items are updated in place by each decision's answer
  current: null,      // digest of the photo shown, null when nothing is left in this view
  busy: false,        // a request is in flight: keys wait (a decision must not overtake the one before)
  undo: [],           // digests decided in this tab, oldest first: U pops them in order
  saves: 0,           // answers taken: a state fetched before one of them is older than the page, and dropped
  filters: { label: "", split: "", changed: false, reviewed: false },
};

// -- talking to the server ------------------------------------------------------------------------------
async function call(path, body) {
  const headers = { "X-Review-Token": TOKEN };
  const init = body === undefined ? { headers }
    : { method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw Object.assign(new Error("the review server does not answer (was it stopped?)"), { status: 0 });
  }
  const text = await res.text();
  let data = null;
  try { data = JSON.parse(text); } catch (e) { data = null; }
  if (!res.ok) {
    const message = (data && data.error) || text.trim() || `${res.status} ${res.statusText}`;
    throw Object.assign(new Error(message), { status: res.status });
  }
  return data;
}

async function loadState(keepPlace) {
  const saves = view.saves;
  const state = await call("api/state");
  if (saves !== view.saves) return;
  const first = view.state === null;
  view.state = state;
  view.byDigest = new Map(state.items.map((item) => [item.digest, item]));
  if (first) fillLabelFilter(state.labels);
  if (!keepPlace || !view.byDigest.has(view.current)) view.current = firstOpen();
  document.body.dataset.ready = "true";
  render();
}

// A decision's answer: the photo's standing decision and the new counts. A newer generation means the
// server reloaded the dataset (prepared again): fetch the whole state.
function take(answer) {
  view.saves += 1;
  const item = view.byDigest.get(answer.digest);
  if (item) item.decision = answer.decision;
  view.state.counts = answer.counts;
  return answer.generation !== view.state.generation;
}

// -- which photos this view walks through ------------------------------------------------------------------
const changed = (item) => !!item.decision && (item.decision.action === "drop" || item.decision.new !== item.teacher);

function inView(item) {
  const f = view.filters;
  return (!f.label || item.teacher === f.label) && (!f.split || item.split === f.split) && (!f.changed || changed(item));
}

function visitable(item) {
  return view.filters.reviewed || view.filters.changed || !item.decision || item.digest === view.current;
}

const listed = () => view.state.items.filter(inView);
const currentItem = () => (view.current && view.byDigest.get(view.current)) || null;

// The first photo in queue order with no decision: where a person picks up after a reload.
function firstOpen() {
  const items = listed();
  const open = items.find((item) => !item.decision);
  if (open) return open.digest;
  return view.filters.reviewed || view.filters.changed ? (items[0] || {}).digest || null : null;
}

// The next (step 1) or previous (-1) visitable photo; `wrap` also looks from the other end (after a decision,
// a photo skipped earlier is still waiting).
function neighbour(step, wrap) {
  const items = listed();
  const at = items.findIndex((item) => item.digest === view.current);
  const order = [];
  for (let i = at + step; i >= 0 && i < items.length; i += step) order.push(items[i]);
  if (wrap) for (let i = step > 0 ? 0 : items.length - 1; i !== at && i >= 0 && i < items.length; i += step) order.push(items[i]);
  const found = order.find((item) => item.digest !== view.current && visitable(item));
  return found ? found.digest : null;
}

function move(step) {
  const next = neighbour(step, false);
  if (next) view.current = next;
  else say(step > 0 ? "this is the last photo in this view" : "this is the first photo in this view", "");
  render();
}

// -- decisions ---------------------------------------------------------------------------------------------
async function decide(action, label) {
  const item = currentItem();
  if (!item) return;
  if (action === "relabel" && label === item.teacher) action = "accept";
  await request(async () => {
    const answer = await call("api/decide", { digest: item.digest, action, label });
    const reload = take(answer);
    view.undo.push(item.digest);
    say(`saved: ${item.image_id} ${describe(answer.decision, item)}`, "ok");
    view.current = neighbour(1, true);
    if (reload) await loadState(true);
  }, "not saved");
}

async function undo() {
  const digest = view.undo[view.undo.length - 1];
  if (!digest) { say("nothing to undo in this tab", ""); return; }
  await request(async () => {
    try {
      const answer = await call("api/undo", { digest });
      view.undo.pop();
      const reload = take(answer);
      view.current = digest;
      say(`undone: ${view.byDigest.get(digest).image_id} is ${describe(answer.decision, view.byDigest.get(digest))}`, "ok");
      if (reload) await loadState(true);
    } catch (e) {
      if (e.status === 400) view.undo.pop();  // already undone elsewhere (another tab): skip it next time
      throw e;
    }
  }, "not undone");
}

// One request at a time; its failure is shown and the page stays on the photo.
async function request(work, failed) {
  if (view.busy) return;
  view.busy = true;
  document.body.dataset.busy = "true";
  say("saving…", "busy");
  try {
    await work();
  } catch (e) {
    say(`${failed}: ${e.message}`, "error");
  } finally {
    view.busy = false;
    document.body.dataset.busy = "false";
    render();
  }
}

function describe(decision, item) {
  if (!decision) return `undecided (teacher: ${item.teacher})`;
  if (decision.action === "drop") return "dropped";
  return decision.new === item.teacher ? `accepted as ${decision.new}` : `relabelled ${item.teacher} → ${decision.new}`;
}

// -- drawing ------------------------------------------------------------------------------------------------
function render() {
  const s = view.state;
  if (!s) return;
  const item = currentItem();
  const items = listed();
  const c = s.counts;
  const at = item ? items.indexOf(item) + 1 : 0;
  $("progress").innerHTML = "";
  $("progress").append(
    el("span", "pos", item ? `${at} / ${items.length}` : `${items.length} in view`),
    el("span", "count", `${c.reviewed} reviewed`), el("span", "count changed", `${c.changed} changed`),
    el("span", "count dropped", `${c.dropped} dropped`), el("span", "count togo", `${c.total - c.reviewed} to go`));
  banner("warning", s.warning);
  banner("notice", s.notice);
  $("review").classList.toggle("empty", !item);
  $("photo-box").dataset.digest = item ? item.digest : "";
  for (const id of ["accept", "drop", "prev", "next"]) $(id).disabled = !item || view.busy;
  $("undo").disabled = view.busy || view.undo.length === 0;
  renderDone(item, items);
  if (!item) return;
  const img = $("photo");
  const src = `img/${encodeURIComponent(item.digest)}?token=${encodeURIComponent(TOKEN)}`;
  if (img.getAttribute("src") !== src) img.src = src;
  img.alt = `photo ${item.image_id}`;
  const badge = $("badge");
  badge.textContent = item.decision ? describe(item.decision, item) : "";
  badge.className = `badge ${item.decision ? (changed(item) ? item.decision.action : "accept") : ""}`;
  renderTeacher(item);
  renderLabels(item, s.labels);
  renderStudent(item, s.labels);
  preload(neighbour(1, true));
}

function renderDone(item, items) {
  $("done").hidden = !!item;
  $("badge").hidden = !item || !item.decision;
  if (item) return;
  const none = items.length === 0;
  $("done-title").textContent = none ? "No photo matches these filters" : "Nothing left to review here";
  $("done-text").textContent = none ? "Change the filters above to see photos again."
    : "Every photo in this view has a decision. Tick “show reviewed” to look back, or change the filters.";
}

function renderTeacher(item) {
  $("teacher").textContent = item.teacher;
  $("confidence").textContent = `confidence ${item.confidence.toFixed(2)}`;
  $("reason").textContent = item.reason;
  const chips = $("chips");
  chips.innerHTML = "";
  chips.append(el("span", `chip ${item.split}`, item.split));
  if (TIER[item.tier]) chips.append(el("span", "chip tier", TIER[item.tier]));
  chips.append(el("span", "chip id", item.image_id));
}

function renderLabels(item, labels) {
  const grid = $("labels");
  grid.innerHTML = "";
  labels.forEach((label, i) => {
    const button = el("button", "label");
    button.type = "button";
    button.dataset.label = label;
    if (i < 9) button.append(el("kbd", "", String(i + 1)));
    button.append(el("span", "name", label));
    if (label === item.teacher) button.append(el("span", "tag", "teacher"));
    button.classList.toggle("teacher", label === item.teacher);
    button.classList.toggle("chosen", !!item.decision && item.decision.new === label);
    button.disabled = view.busy;
    button.addEventListener("click", () => { button.blur(); decide("relabel", label); });
    grid.append(button);
  });
}

function renderStudent(item, labels) {
  const bars = $("bars");
  bars.innerHTML = "";
  $("student-source").textContent = item.predictions_from ? `from ${item.predictions_from}` : "";
  if (!item.student) {
    bars.append(el("p", "none", "No out-of-sample prediction for this photo (see About this queue)."));
    return;
  }
  for (const label of labels) {
    const p = item.student[label] || 0;
    const row = el("div", "bar-row");
    row.classList.toggle("top", label === item.student_label);
    row.classList.toggle("teacher", label === item.teacher);
    const fill = el("span", "fill");
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    row.append(el("span", "name", label), el("span", "track", "", fill), el("span", "value", `${(p * 100).toFixed(0)}%`));
    bars.append(row);
  }
}

function preload(digest) {
  if (digest) new Image().src = `img/${encodeURIComponent(digest)}?token=${encodeURIComponent(TOKEN)}`;
}

function banner(id, text) {
  $(id).hidden = !text;
  $(id).textContent = text || "";
}

function say(text, kind) {
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

function el(tag, className, text, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  node.append(...children);
  return node;
}

function fillLabelFilter(labels) {
  for (const label of labels) $("f-label").append(new Option(label, label));
  $("notes").replaceChildren(...view.state.notes.map((note) => el("li", "", note)));
}

// -- input ---------------------------------------------------------------------------------------------------
function onKey(e) {
  const t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || t instanceof HTMLSelectElement || t instanceof HTMLInputElement) return;
  const labels = view.state ? view.state.labels : [];
  const k = e.key;
  let act = null;
  if (/^[1-9]$/.test(k) && labels[Number(k) - 1]) act = () => decide("relabel", labels[Number(k) - 1]);
  else if (k === "Enter" || k === " ") act = () => decide("accept");
  else if (k === "x" || k === "X") act = () => decide("drop");
  else if (k === "u" || k === "U") act = () => undo();
  else if (k === "ArrowLeft") act = () => move(-1);
  else if (k === "ArrowRight") act = () => move(1);
  if (!act) return;
  e.preventDefault();  // Space would scroll; Enter on a focused button would click it too
  if (t instanceof HTMLButtonElement) t.blur();
  if (e.repeat || view.busy) return;  // a held key must not decide a row of photos
  act();
}

function onFilter() {
  view.filters = {
    label: $("f-label").value, split: $("f-split").value,
    changed: $("f-changed").checked, reviewed: $("f-reviewed").checked,
  };
  // Stay on the photo when the new view still walks through it; else go where work is left in the new view.
  const item = currentItem();
  const f = view.filters;
  if (!item || !inView(item) || (item.decision && !f.reviewed && !f.changed)) view.current = firstOpen();
  render();
}

function button(id, action) {
  $(id).addEventListener("click", (e) => { e.currentTarget.blur(); action(); });
}

function start() {
  document.addEventListener("keydown", onKey);
  for (const id of ["f-label", "f-split", "f-changed", "f-reviewed"]) $(id).addEventListener("change", onFilter);
  button("accept", () => decide("accept"));
  button("drop", () => decide("drop"));
  button("undo", () => undo());
  button("prev", () => move(-1));
  button("next", () => move(1));
  // Another tab (or server) may have decided meanwhile: the log on disk is the truth, fetch it again.
  window.addEventListener("focus", () => { if (!view.busy && view.state) loadState(true).catch(showLoadError); });
  loadState(false).catch(showLoadError);
}

function showLoadError(e) {
  say(`cannot load the queue: ${e.message}`, "error");
  banner("warning", e.message);
}

start();
