// The ranking page: shows the annotator's next item, lets them order its responses (drag, or keys alone),
// and submits. Every model string goes into the page with textContent, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { annotator: "", item: null, busy: false };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await response.json(); } catch (err) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw Object.assign(new Error(body.error || `HTTP ${response.status}`), { status: response.status });
  return body;
}

// -- showing an item ----------------------------------------------------------------------------

function responseItems() { return Array.from($("responses").children); }

function renumber() {
  responseItems().forEach((li, place) => {
    li.querySelector(".place").textContent = String(place + 1);
    li.setAttribute("aria-label", `Place ${place + 1} of ${responseItems().length}`);
  });
}

function describe(item, index) {
  const parts = [];
  if (item.tokens) parts.push(`${item.tokens[index]} tokens`);
  if (item.stopped) parts.push(item.stopped[index] ? "stopped" : "cut off (no end of turn)");
  return parts.join(" · ");
}

function showProgress(progress) {
  const at = Math.min(progress.decided + 1, progress.total);
  $("progress").textContent = `Item ${at} of ${progress.total} · ${progress.ranked} ranked · ` +
    `${progress.skipped} skipped · ${progress.flagged} flagged`;
}

function show(payload) {
  state.item = payload.item;
  showProgress(payload.progress);
  const prompt = $("prompt");
  const list = $("responses");
  prompt.replaceChildren();
  list.replaceChildren();
  list.dataset.item = state.item ? state.item.id : "";
  $("reason").value = "";
  if (!state.item) {
    $("prompt-box").hidden = true;
    $("ranking-box").hidden = true;
    const p = payload.progress;
    setStatus(`All done: ${p.ranked} ranked, ${p.skipped} skipped, ${p.flagged} flagged. Thank you!`);
    return;
  }
  for (const message of state.item.messages) {
    const turn = document.createElement("div");
    turn.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = message.role;
    turn.append(role, document.createTextNode(message.content));
    prompt.append(turn);
  }
  for (const index of state.item.shown) {
    const li = document.createElement("li");
    li.className = "response";
    li.tabIndex = 0;
    li.dataset.index = String(index);
    const place = document.createElement("span");
    place.className = "place";
    const body = document.createElement("div");
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = state.item.responses[index];
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = describe(state.item, index);
    body.append(text, meta);
    li.append(place, body);
    list.append(li);
  }
  renumber();
  $("prompt-box").hidden = false;
  $("ranking-box").hidden = false;
  list.firstElementChild.focus();
}

async function loadNext() {
  if (!state.annotator) return;
  try {
    show(await api(`/api/next?annotator=${encodeURIComponent(state.annotator)}`));
  } catch (err) {
    setStatus(err.message, true);
  }
}

// -- submitting ---------------------------------------------------------------------------------

async function decide(action) {
  if (!state.item || state.busy) return;
  state.busy = true;
  const body = { annotator: state.annotator, item: state.item.id, action, shown: state.item.shown };
  if (action === "rank") body.ranking = responseItems().map((li) => Number(li.dataset.index));
  else if ($("reason").value.trim()) body.reason = $("reason").value.trim();
  try {
    const reply = await api("/api/submit", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    show(reply);
    const done = { rank: "Saved your ranking", skip: "Skipped", flag: "Flagged" }[action];
    if (reply.item) setStatus(`${done}. Next item.`);
  } catch (err) {
    setStatus(err.message, true);
    if (err.status === 409) await loadNext();  // decided already (another tab): move on
  } finally {
    state.busy = false;
  }
}

// -- reordering by keys -------------------------------------------------------------------------

function moveTo(li, place) {
  const others = responseItems().filter((other) => other !== li);
  const clamped = Math.max(0, Math.min(place, others.length));
  $("responses").insertBefore(li, others[clamped] || null);
  renumber();
  li.focus();  // moving a node in the document drops its focus
}

function onKey(event) {
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
  if (event.ctrlKey || event.metaKey || event.altKey || !state.item) return;
  const focused = target instanceof HTMLElement && target.classList.contains("response") ? target : null;
  const items = responseItems();
  const place = focused ? items.indexOf(focused) : -1;
  const key = event.key;
  if ((key === "ArrowUp" || key === "ArrowDown") && event.shiftKey && focused) {
    moveTo(focused, place + (key === "ArrowUp" ? -1 : 1));
  } else if (key === "ArrowUp" || key === "k") {
    (items[Math.max(place - 1, 0)] || items[0]).focus();
  } else if (key === "ArrowDown" || key === "j") {
    (items[Math.min(place + 1, items.length - 1)] || items[0]).focus();
  } else if (/^[1-9]$/.test(key) && focused && Number(key) <= items.length) {
    moveTo(focused, Number(key) - 1);
  } else if (key === "Enter" && !(target instanceof HTMLButtonElement)) {
    decide("rank");
  } else if (key === "s" || key === "S") {
    decide("skip");
  } else if (key === "f" || key === "F") {
    decide("flag");
  } else {
    return;
  }
  event.preventDefault();
}

// -- reordering by dragging (pointer events: mouse, pen and touch alike) ------------------------

const DRAG_THRESHOLD_PX = 4;  // a press that moves less is a click that focuses the response
let drag = null;

function onPointerDown(event) {
  const li = event.target.closest(".response");
  if (!li || event.button !== 0) return;
  event.preventDefault();  // no text selection, no native drag
  li.focus();
  drag = { li, startY: event.clientY, active: false };
}

function onPointerMove(event) {
  if (!drag) return;
  if (!drag.active) {
    if (Math.abs(event.clientY - drag.startY) < DRAG_THRESHOLD_PX) return;
    drag.active = true;
    drag.li.classList.add("dragging");
  }
  // Put the dragged response before the first other one whose middle lies below the pointer.
  const before = responseItems().find((other) => {
    if (other === drag.li) return false;
    const box = other.getBoundingClientRect();
    return event.clientY < box.top + box.height / 2;
  });
  if (before !== drag.li.nextElementSibling) $("responses").insertBefore(drag.li, before || null);
}

function onPointerUp() {
  if (!drag) return;
  const { li, active } = drag;
  drag = null;
  if (active) {
    li.classList.remove("dragging");
    renumber();
    li.focus();
  }
}

// -- start --------------------------------------------------------------------------------------

function start(name) {
  state.annotator = name.trim();
  if (!state.annotator) return;
  localStorage.setItem("llmsys-rank-annotator", state.annotator);
  $("annotator").value = state.annotator;
  const url = new URL(window.location.href);
  url.searchParams.set("annotator", state.annotator);
  url.searchParams.delete("token");  // the server has set its cookie; keep the token out of the history
  history.replaceState(null, "", url);
  setStatus("");
  loadNext();
}

document.addEventListener("DOMContentLoaded", () => {
  $("who").addEventListener("submit", (event) => { event.preventDefault(); start($("annotator").value); });
  $("submit").addEventListener("click", () => decide("rank"));
  $("skip").addEventListener("click", () => decide("skip"));
  $("flag").addEventListener("click", () => decide("flag"));
  document.addEventListener("keydown", onKey);
  $("responses").addEventListener("pointerdown", onPointerDown);
  window.addEventListener("pointermove", onPointerMove);
  window.addEventListener("pointerup", onPointerUp);
  window.addEventListener("pointercancel", onPointerUp);
  const fromUrl = new URL(window.location.href).searchParams.get("annotator");
  const name = fromUrl || localStorage.getItem("llmsys-rank-annotator") || "";
  if (name) start(name);
  else setStatus("Enter your name to start.");
});
