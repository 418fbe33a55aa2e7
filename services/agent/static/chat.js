// The chat page: sends each turn to the agent (POST /) and rebuilds the dialog from the agent's
// stored state (GET /api/dialogs/<id>) after a reload. Each tab is its own user (sessionStorage),
// so a second tab holds a separate dialog. An agent with API keys answers 401: the page then asks
// for a key once and keeps it in the tab (sessionStorage, gone when the tab closes), sending it as
// `Authorization: Bearer <key>` with every request.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
const message = $("message");
const sendButton = $("send");
const errorBox = $("error");
const promptBox = $("prompt");
const llmPicker = $("llm");

const stored = {
  get: (name) => sessionStorage.getItem("parley." + name),
  set: (name, value) => value ? sessionStorage.setItem("parley." + name, value) : sessionStorage.removeItem("parley." + name),
};

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function userId() {
  let id = stored.get("userId");
  if (!id) {
    id = "web-" + randomId();
    stored.set("userId", id);
  }
  return id;
}

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
}

function showDialogId(dialogId) {
  $("dialog-id").textContent = dialogId ? "dialog " + dialogId : "";
}

function showEmpty() {
  log.replaceChildren();
  const hint = document.createElement("p");
  hint.className = "empty";
  hint.textContent = "Say something to start a dialog.";
  log.append(hint);
}

function addTurn(kind, text, meta) {
  log.querySelector(".empty")?.remove();
  const bubble = document.createElement("div");
  bubble.className = "turn " + kind;
  bubble.textContent = text;
  if (meta) setMeta(bubble, meta);
  log.append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function setMeta(bubble, { skill, seconds }) {
  const meta = document.createElement("span");
  meta.className = "meta";
  const skillName = document.createElement("span");
  skillName.className = "skill";
  skillName.textContent = skill;
  meta.append(skillName);
  if (seconds !== undefined && seconds !== null && !Number.isNaN(seconds)) {
    meta.append(document.createTextNode(" · " + seconds.toFixed(2) + " s"));
  }
  bubble.append(meta);
}

// One question for the key at a time, however many requests were refused at once (the page loads
// the dialog and the LLM list together). The dialog closes the browser's own way (its form's
// method="dialog", Escape, or Cancel), so the browser hands the keyboard back to the message box.
let keyQuestion = null;

function askForKey(refusedBefore) {
  if (keyQuestion) return keyQuestion;
  const dialog = $("key-dialog");
  const input = $("api-key");
  const note = $("key-note");
  note.textContent = refusedBefore ? "The agent did not accept that key; check it and try again." : "";
  note.hidden = !refusedBefore;
  input.value = "";
  keyQuestion = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = dialog.returnValue === "ok" ? input.value.trim() : "";
      input.value = "";  // the key lives in sessionStorage only, not in the page
      keyQuestion = null;
      // Chromium gives the focus back without a caret, so typed text would go nowhere: place one.
      const back = document.activeElement;
      if (back && back.setSelectionRange) back.setSelectionRange(back.value.length, back.value.length);
      resolve(key || null);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
  return keyQuestion;
}

$("key-cancel").addEventListener("click", () => $("key-dialog").close(""));

// fetch() with the tab's key; on a 401 the person is asked for a key (again, while the agent
// refuses it; Cancel gives up and the caller shows the agent's error).
async function api(path, options = {}) {
  const withKey = (key) => ({ ...options, headers: { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) } });
  let key = stored.get("apiKey");
  let response = await fetch(path, withKey(key));
  while (response.status === 401) {
    const refusedBefore = Boolean(key);
    stored.set("apiKey", null);
    key = await askForKey(refusedBefore);
    if (!key) return response;
    response = await fetch(path, withKey(key));
    if (response.status !== 401) stored.set("apiKey", key);
  }
  return response;
}

async function errorMessage(response) {
  // Every Parley service answers errors as {"error": {"message": ..., "field": ...}}.
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (ignored) { /* not JSON: fall through */ }
  return "the agent answered " + response.status + " " + response.statusText;
}

async function loadHistory() {
  const dialogId = stored.get("dialogId");
  showDialogId(dialogId);
  if (!dialogId) return showEmpty();
  let response;
  try {
    response = await api("api/dialogs/" + encodeURIComponent(dialogId));
  } catch (error) {
    return showError("Cannot reach the agent to load this dialog: " + error.message);
  }
  if (response.status === 404) {
    stored.set("dialogId", null);
    showDialogId(null);
    return showEmpty();
  }
  if (!response.ok) return showError("Cannot load this dialog: " + await errorMessage(response));
  const dialog = await response.json();
  log.replaceChildren();
  let askedAt = null;
  for (const utterance of dialog.utterances) {
    if (utterance.user.user_type === "human") {
      askedAt = Date.parse(utterance.date_time);
      addTurn("user", utterance.text);
    } else {
      const seconds = askedAt === null ? null : (Date.parse(utterance.date_time) - askedAt) / 1000;
      addTurn("bot", utterance.text, { skill: utterance.active_skill || "unknown skill", seconds });
    }
  }
  if (!dialog.utterances.length) showEmpty();
}

async function loadLLMs() {
  const note = $("llm-note");
  try {
    const response = await api("api/llms");
    if (!response.ok) throw new Error(await errorMessage(response));
    const { llms } = await response.json();
    for (const llm of llms) {
      const option = document.createElement("option");
      option.value = llm.url;
      option.textContent = llm.model && llm.model !== llm.name ? llm.name + " (" + llm.model + ")" : llm.name;
      llmPicker.append(option);
    }
    note.textContent = llms.length ? "The distribution's LLMs, from its component cards." : "The skills report no LLM to pick.";
  } catch (error) {
    note.textContent = "Cannot list the LLMs: " + error.message;
  }
  const chosen = stored.get("llm");
  if (chosen && [...llmPicker.options].some((o) => o.value === chosen)) llmPicker.value = chosen;
}

async function send(text) {
  showError("");
  const body = { user_id: userId(), payload: text };
  const prompt = promptBox.value.trim();
  if (prompt) body.prompt = prompt;
  if (llmPicker.value) body.lm_service_url = llmPicker.value;
  addTurn("user", text);
  const pending = addTurn("bot pending", "…");
  sendButton.disabled = true;
  const started = performance.now();
  try {
    const response = await api("./", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const answer = await response.json();
    pending.remove();
    addTurn("bot", answer.response, { skill: answer.active_skill, seconds: (performance.now() - started) / 1000 });
    stored.set("dialogId", answer.dialog_id);
    showDialogId(answer.dialog_id);
  } catch (error) {
    pending.remove();
    log.lastElementChild?.classList.add("failed");
    showError("Your message was not answered: " + error.message);
    if (!message.value) message.value = text;  // nothing typed is lost
  } finally {
    sendButton.disabled = false;
    message.focus();
  }
}

async function newDialog() {
  showError("");
  try {
    const response = await api("./", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user_id: userId(), payload: "/start" }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
  } catch (error) {
    return showError("Cannot start a new dialog: " + error.message);
  }
  stored.set("dialogId", null);
  showDialogId(null);
  showEmpty();
  message.focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = message.value.trim();
  if (!text || sendButton.disabled) return;
  message.value = "";
  send(text);
});

message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-dialog").addEventListener("click", newDialog);
promptBox.value = stored.get("prompt") || "";
promptBox.addEventListener("change", () => stored.set("prompt", promptBox.value.trim()));
llmPicker.addEventListener("change", () => stored.set("llm", llmPicker.value));

loadHistory();
loadLLMs();
