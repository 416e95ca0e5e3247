// Rivulet's demo page: start a resumable stream with POST /v1/streams, read it with EventSource.
//
// EventSource can only GET and cannot send headers, so the API key goes with the POST alone; the
// stream's unguessable id, in the URL the POST returns, is what lets this page read (and stop) it.
// Every event has an id, so after a dropped connection EventSource reconnects by itself with
// Last-Event-ID and the server resumes right after it: nothing to do here but show it happened.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const startButton = $("start");
const stopButton = $("stop");

let current = null; // {source, url, startedAt, firstTokenAt, tokens, usageTokens}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
}

function setRunning(running) {
  startButton.disabled = running;
  stopButton.disabled = !running;
}

function updateStats() {
  if (!current || current.firstTokenAt === null) return;
  const tokens = current.usageTokens ?? current.tokens;
  $("ttft").textContent = `${Math.round(current.firstTokenAt - current.startedAt)} ms`;
  $("tokens").textContent = String(tokens);
  const seconds = (performance.now() - current.firstTokenAt) / 1000;
  if (seconds > 0 && tokens > 1) {
    // After the first token: the decode rate, not diluted by queueing and prefill.
    $("tps").textContent = ((tokens - 1) / seconds).toFixed(1);
  }
}

function finish(status) {
  if (!current) return;
  current.source.close();
  updateStats();
  current = null;
  setStatus(status);
  setRunning(false);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function start(event) {
  event.preventDefault();
  if (current) return;
  showError("");
  $("output").textContent = "";
  for (const id of ["ttft", "tps", "stream-id"]) $(id).textContent = "–";
  $("tokens").textContent = "0";
  $("reconnects").textContent = "0";

  const body = {
    kind: "chat",
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    // Small models loop ("R. R. R."); a mild penalty on tokens already seen keeps the demo readable.
    repetition_penalty: Number($("repetition-penalty").value),
    // Generate all max_tokens even past the model's end of text: long streams to watch.
    ignore_eos: $("ignore-eos").checked,
    stream_options: { include_usage: true },
  };
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["X-Auth-Token"] = key;

  setRunning(true);
  setStatus("starting");
  const startedAt = performance.now();
  let response;
  try {
    response = await fetch("v1/streams", { method: "POST", headers, body: JSON.stringify(body) });
  } catch (err) {
    showError(`could not reach the server: ${err}`);
    setRunning(false);
    setStatus("idle");
    return;
  }
  if (response.status !== 201) {
    showError(await errorMessage(response));
    setRunning(false);
    setStatus("idle");
    return;
  }
  const stream = await response.json();
  $("stream-id").textContent = stream.id;
  read(stream.url, startedAt);
}

function read(url, startedAt) {
  const source = new EventSource(url);
  current = { source, url, startedAt, firstTokenAt: null, tokens: 0, usageTokens: null };
  let reconnects = 0;
  let opened = false;

  source.onopen = () => {
    if (opened) {
      reconnects += 1;
      $("reconnects").textContent = String(reconnects);
    }
    opened = true;
    setStatus("streaming");
  };

  source.onmessage = (message) => {
    if (!current || current.source !== source || message.data === "[DONE]") return;
    const payload = JSON.parse(message.data);
    if (payload.error) {
      showError(`${payload.error.type}: ${payload.error.message}`);
      return;
    }
    if (payload.usage) current.usageTokens = payload.usage.completion_tokens;
    const choice = payload.choices?.[0];
    const text = choice?.delta?.content ?? choice?.text ?? "";
    if (text) {
      if (current.firstTokenAt === null) current.firstTokenAt = performance.now();
      current.tokens += 1;
      $("output").textContent += text;
    }
    updateStats();
  };

  // The last event: the stream is complete, so stop EventSource from reconnecting.
  source.addEventListener("done", () => {
    if (current && current.source === source) finish("done");
  });

  source.onerror = () => {
    if (!current || current.source !== source) return;
    if (source.readyState === EventSource.CONNECTING) {
      setStatus("reconnecting");  // EventSource retries by itself, with Last-Event-ID
    } else {
      finish("closed");  // a 204, 404 or other non-stream answer: EventSource gave up
    }
  };
}

async function stop() {
  if (!current) return;
  const url = current.url;
  finish("stopped");
  // Cancels the generation on the server; the stream's id is the capability, no key needed.
  try {
    const response = await fetch(url, { method: "DELETE" });
    if (!response.ok && response.status !== 404) showError(await errorMessage(response));
  } catch (err) {
    showError(`could not stop the stream: ${err}`);
  }
}

form.addEventListener("submit", start);
stopButton.addEventListener("click", stop);
