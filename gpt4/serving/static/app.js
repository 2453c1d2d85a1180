// The chat page: talks to this server's OpenAI API with streaming (fetch + server-sent events).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the current chat
let controller = null;  // AbortController of the reply being streamed

const settings = ["temperature", "top-p", "max-tokens", "repetition-penalty", "seed", "system", "api-key"];
for (const id of settings) {
  const saved = localStorage.getItem("gpt4." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("gpt4." + id, $(id).value));
}
for (const id of ["temperature", "top-p"]) {
  const show = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;  // otherwise the browser's Basic credentials (if any) are used
  return h;
}

function status(text) { $("status").textContent = text || ""; }

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { status("Models: " + await errorText(response)); return; }
  const models = (await response.json()).data;
  const select = $("model");
  const previous = select.value || localStorage.getItem("gpt4.model");
  select.innerHTML = "";
  for (const m of models) select.add(new Option(m.id, m.id));
  if (previous && models.some((m) => m.id === previous)) select.value = previous;
  status("");
}
$("model").addEventListener("change", () => localStorage.setItem("gpt4.model", $("model").value));
$("api-key").addEventListener("change", loadModels);

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  if (role === "assistant") div.innerHTML = renderMarkdown(text); else div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: $("model").value, messages, stream: true,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10) || 512,
  };
  const penalty = parseFloat($("repetition-penalty").value);
  if (penalty && penalty !== 1) body.repetition_penalty = penalty;
  const seed = parseInt($("seed").value, 10);
  if (!isNaN(seed)) body.seed = seed;
  return body;
}

// Read server-sent events; call onData with each parsed JSON payload until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  let reply = "";
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        reply += delta.content;
        div.innerHTML = renderMarkdown(reply);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") {
      div.classList.add("error");
      div.textContent = (reply ? reply + "\n\n" : "") + "Error: " + e.message;
    }
  } finally {
    div.classList.remove("streaming");
    controller = null;
    busy(false);
    // Keep what was said, even when stopped, so the conversation continues from what the user saw.
    if (reply) history.push({ role: "assistant", content: reply }); else history.pop();
    div.dataset.done = "true";
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").innerHTML = "";
  $("input").focus();
});

loadModels().catch((e) => status("Cannot reach the server: " + e.message));
