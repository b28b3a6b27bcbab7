// oneword's page: learn a word from photos, follow its progress, draw with it, manage your words.
// Plain JavaScript against the HTTP API (docs at /docs); nothing is loaded from another site.
"use strict";

const $ = (sel) => document.querySelector(sel);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
const state = { key: localStorage.getItem("oneword-key") || "", files: [], job: null, losses: [], previews: {} };

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function authHeaders(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

// One API call; 429 and 503 are retried after Retry-After (shown where the caller says), other
// errors become an ApiError with the server's one sentence.
async function api(method, path, body, say = () => {}) {
  const json = body !== undefined && !(body instanceof FormData);
  const idem = body instanceof FormData && method === "POST" ? crypto.randomUUID() : null;
  for (let attempt = 0; attempt < 30; attempt++) {
    const headers = authHeaders(json ? { "Content-Type": "application/json" } : {});
    if (idem) headers["Idempotency-Key"] = idem; // a retry cannot make a second job
    let r;
    try {
      r = await fetch(path, { method, headers, body: json ? JSON.stringify(body) : body });
    } catch (err) {
      say("cannot reach the server, retrying in 2 s");
      await sleep(2000);
      continue;
    }
    if (r.status === 429 || r.status === 503) {
      const wait = Math.max(1, parseInt(r.headers.get("Retry-After") || "2", 10));
      say(`busy, retrying in ${wait} s`);
      await sleep(wait * 1000);
      continue;
    }
    say("");
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
      if (r.status === 401) detail = "the server needs an API key: enter yours above";
      throw new ApiError(r.status, detail);
    }
    return r;
  }
  throw new ApiError(429, "the server stayed busy; try again later");
}

function pngs(body) {
  return body.images.map((im) => {
    const img = new Image();
    img.src = `data:image/png;base64,${im.png_base64}`;
    img.alt = `seed ${im.seed}`;
    return img;
  });
}

// ------------------------------------------------------------------ API key
$("#key").value = state.key;
$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("#key").value.trim();
  localStorage.setItem("oneword-key", state.key);
  $("#key-note").textContent = state.key ? "key saved in this browser" : "key cleared";
  refreshWords();
});

// ------------------------------------------------------------------ photos
function choose(files) {
  state.files = Array.from(files).filter((f) => f.size > 0);
  const list = $("#thumbs");
  list.replaceChildren();
  for (const f of state.files) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.alt = f.name;
    img.src = URL.createObjectURL(f);
    li.append(img);
    list.append(li);
  }
  $("#learn-error").textContent = state.files.length && (state.files.length < 3 || state.files.length > 5)
    ? `${state.files.length} photo(s) chosen: 3-5 work best` : "";
}
$("#photos").addEventListener("change", (e) => choose(e.target.files));
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files); });

// ------------------------------------------------------------------ learning
$("#learn-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const error = $("#learn-error");
  error.textContent = "";
  if (!state.files.length) { error.textContent = "choose some photos first"; return; }
  const form = new FormData();
  for (const f of state.files) form.append("images", f, f.name);
  if ($("#token").value.trim()) form.append("token", $("#token").value.trim());
  $("#start").disabled = true;
  try {
    const r = await api("POST", "/v1/words", form, (s) => { $("#stage").textContent = s; });
    const job = await r.json();
    startFollowing(job);
  } catch (err) {
    error.textContent = err.message;
    $("#start").disabled = false;
  }
});

$("#cancel").addEventListener("click", async () => {
  if (!state.job) return;
  try {
    await api("POST", `/v1/jobs/${state.job.id}/cancel`);
    $("#stage").textContent = "canceling after this step...";
  } catch (err) { $("#learn-error").textContent = err.message; }
});

function startFollowing(job) {
  state.job = job;
  state.losses = [];
  $("#progress").hidden = false;
  $("#preview-provisional").replaceChildren();
  $("#preview-final").replaceChildren();
  $("#cancel").disabled = false;
  $("#token").value = job.token;
  if (!$("#prompt").value) $("#prompt").value = `a photo of ${job.token}`;
  $("#stage").textContent = `queued as ${job.token}`;
  follow(job.id);
}

// Server-sent events through fetch (EventSource cannot send the API key); a lost connection is
// resumed with Last-Event-ID, so no event is missed or repeated.
async function follow(jobId) {
  let last = 0;
  for (;;) {
    try {
      const headers = authHeaders(last ? { "Last-Event-ID": String(last) } : {});
      const r = await fetch(`/v1/jobs/${jobId}/events`, { headers });
      if (!r.ok) throw new ApiError(r.status, r.statusText);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          last = event.id;
          if (await onEvent(event)) return;
        }
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) { $("#stage").textContent = "this job is gone"; return; }
    }
    $("#stage").textContent = "connection lost, reconnecting...";
    await sleep(1000);
  }
}

function parseEvent(block) {
  const event = {};
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const at = line.indexOf(": ");
    if (at > 0) event[line.slice(0, at)] = line.slice(at + 2);
  }
  return event.id ? { id: parseInt(event.id, 10), type: event.event, data: JSON.parse(event.data) } : null;
}

async function onEvent(event) {
  const d = event.data;
  const bar = $("#bar");
  bar.max = Math.max(1, d.total);
  bar.value = d.step;
  const stage = d.stage === "encode" ? "encoding the photos" : `refining: step ${d.step} of ${d.total}`;
  $("#stage").textContent = `${d.state}: ${stage}${d.loss != null ? `, loss ${d.loss.toFixed(4)}` : ""}`;
  if (event.type === "progress") {
    state.losses.push(d.loss);
    drawLoss();
  } else if (event.type === "provisional") {
    preview(d.word_id, "#preview-provisional", true);
    refreshWords();
  } else if (["succeeded", "failed", "canceled"].includes(event.type)) {
    $("#cancel").disabled = true;
    $("#start").disabled = false;
    $("#stage").textContent = event.type === "succeeded" ? `done: ${state.job.token} is ready`
      : event.type === "failed" ? `failed: ${d.error}` : `canceled at step ${d.step}; the word so far is kept`;
    if (d.word_id) preview(d.word_id, "#preview-final", true);
    refreshWords();
    return true;
  }
  return false;
}

function drawLoss() {
  const canvas = $("#loss");
  const ctx = canvas.getContext("2d");
  const v = state.losses.filter((x) => x != null);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (v.length < 2) return;
  const lo = Math.min(...v), hi = Math.max(...v), span = hi - lo || 1;
  let avg = v[0];
  const smooth = v.map((y) => (avg = 0.9 * avg + 0.1 * y)); // each step's loss is noisy: its trend
  for (const [line, color, width] of [[v, "#b8c4ee", 1], [smooth, "#2952cc", 2]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    line.forEach((y, i) => {
      const px = (i / (line.length - 1)) * (canvas.width - 4) + 2;
      const py = canvas.height - 4 - ((y - lo) / span) * (canvas.height - 8);
      if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    });
    ctx.stroke();
  }
}

// Four images of "a photo of <word>", drawn once per word version.
async function preview(wordId, where, fresh = false) {
  const target = typeof where === "string" ? $(where) : where;
  try {
    const word = await (await api("GET", `/v1/words/${wordId}`)).json();
    const key = `${wordId}:${word.updated}:${target.id || "list"}`;
    if (!state.previews[key] || fresh) {
      const n = target.classList && target.classList.contains("small") ? 4 : 1;
      const body = { prompt: `a photo of ${word.token}`, n, steps: 25, seed: 0 };
      state.previews[key] = await (await api("POST", "/v1/images", body)).json();
    }
    target.replaceChildren(...pngs(state.previews[key]));
  } catch (err) {
    target.textContent = err.message;
  }
}

// ------------------------------------------------------------------ drawing
$("#draw-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#draw-error").textContent = "";
  $("#draw").disabled = true;
  const body = {
    prompt: $("#prompt").value,
    n: parseInt($("#n").value, 10),
    steps: parseInt($("#steps").value, 10),
    seed: parseInt($("#seed").value, 10) || 0,
  };
  try {
    const r = await api("POST", "/v1/images", body, (s) => { $("#draw-status").textContent = s; });
    const out = await r.json();
    $("#images").replaceChildren(...pngs(out));
    $("#draw-status").textContent = out.words.length ? `used ${out.words.length} of your words` : "no word of yours in this prompt";
  } catch (err) {
    $("#draw-error").textContent = err.message;
  } finally {
    $("#draw").disabled = false;
  }
});

// ------------------------------------------------------------------ your words
async function download(word, layout) {
  const r = await api("GET", word.files[layout]);
  const name = (r.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name ? name[1] : `${layout}.safetensors`;
  document.body.append(a);
  a.click();
  a.remove();
}

async function refreshWords() {
  const list = $("#words");
  $("#words-error").textContent = "";
  try {
    const { words } = await (await api("GET", "/v1/words")).json();
    list.replaceChildren(...words.map((w) => {
      const li = document.createElement("li");
      li.dataset.word = w.id;
      const pic = document.createElement("div");
      pic.id = `word-${w.id}`;
      const label = document.createElement("span");
      label.innerHTML = "";
      const code = document.createElement("code");
      code.textContent = w.token;
      label.append(code, ` ${w.status === "provisional" ? "provisional" : w.kept} (${w.steps} steps)`);
      li.append(pic, label);
      for (const layout of Object.keys(w.files)) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "plain";
        b.textContent = layout === "a1111" ? "Download A1111" : `Download ${layout}`;
        b.setAttribute("aria-label", `${b.textContent} file of ${w.token}`);
        b.addEventListener("click", () => download(w, layout).catch((err) => { $("#words-error").textContent = err.message; }));
        li.append(b);
      }
      const del = document.createElement("button");
      del.type = "button";
      del.className = "plain";
      del.textContent = "Delete";
      del.setAttribute("aria-label", `Delete ${w.token}`);
      del.addEventListener("click", async () => {
        try { await api("DELETE", `/v1/words/${w.id}`); refreshWords(); }
        catch (err) { $("#words-error").textContent = err.message; }
      });
      li.append(del);
      preview(w.id, pic);
      return li;
    }));
  } catch (err) {
    $("#words-error").textContent = err.message;
  }
}

refreshWords();
