// effvit serve: the page. Files are sent one at a time (so a batch shows its progress) to the server's
// JSON endpoints; every result goes on its own card. The session token keeps this tab's files apart.
"use strict";

const state = { session: null, info: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

async function send(url, file) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    body: file,
  });
  let reply;
  try {
    reply = await response.json();
  } catch (e) {
    throw new Error(`the server answered ${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(reply.error || `the server answered ${response.status}`);
  return reply;
}

// A queue per tab: files dropped while others are still being worked on join the same batch.
class Batch {
  constructor(prefix, work) {
    this.box = $(`${prefix}-progress`);
    this.bar = this.box.querySelector("progress");
    this.count = this.box.querySelector(".count");
    this.work = work;
    this.queue = [];
    this.done = 0;
    this.failed = 0;
    this.total = 0;
    this.running = false;
  }

  add(jobs) {
    if (!this.running) { this.done = 0; this.failed = 0; this.total = 0; }
    this.queue.push(...jobs);
    this.total += jobs.length;
    this.show();
    if (!this.running) this.run();
  }

  async run() {
    this.running = true;
    while (this.queue.length) {
      const job = this.queue.shift();
      job.card.classList.add("working");
      try {
        await this.work(job);
      } catch (e) {
        failCard(job.card, e.message);
        this.failed += 1;
      }
      job.card.classList.remove("working");
      this.done += 1;
      this.show();
    }
    this.running = false;
    this.show();
  }

  show() {
    this.box.hidden = false;
    this.bar.max = Math.max(this.total, 1);
    this.bar.value = this.done;
    const errors = this.failed ? `, ${this.failed} with errors` : "";
    this.count.textContent = `${this.done} of ${this.total} done${errors}`;
    this.box.dataset.done = String(this.done);
    this.box.dataset.total = String(this.total);
    this.box.dataset.idle = String(!this.running);
  }
}

function failCard(card, message) {
  card.classList.add("failed");
  card.dataset.state = "error";
  card.querySelector(".error").textContent = message;
}

function newCard(container, file) {
  const card = el("article", { class: "card", "data-name": file.name, "data-state": "waiting" },
    el("h3", { class: "name", textContent: file.name, title: file.name }),
    el("div", { class: "body" }),
    el("p", { class: "error" }));
  container.append(card);
  return card;
}

function tooLarge(file) {
  if (file.size <= state.info.max_bytes) return null;
  const size = file.size >= 1e5 ? `${(file.size / 1e6).toFixed(1)} MB` : `${(file.size / 1e3).toFixed(0)} kB`;
  return `${file.name} is ${size}: ${state.info.limit}`; // as the server words it (ServeApp.too_large)
}

// ---- Straighten -------------------------------------------------------------------------------------------

function straightenParams() {
  const p = new URLSearchParams({
    range: $("s-range").value.trim(),
    crop: $("s-crop").value,
    tta: $("s-tta").value,
    lines: $("s-lines").checked ? "1" : "0",
    always: $("s-always").checked ? "1" : "0",
  });
  return p.toString();
}

function picture(src, caption) {
  return el("figure", {}, el("img", { src, alt: caption, loading: "lazy" }), el("figcaption", { textContent: caption }));
}

async function straightenOne(job) {
  const { file, card, params } = job;
  const problem = tooLarge(file);
  if (problem) throw new Error(problem);
  const r = await send(`/api/${state.session}/straighten?${params}`, file);
  card.dataset.index = String(r.index);
  if (r.error) throw new Error(r.error);
  const base = `/api/${state.session}/file/${r.index}`;
  card.dataset.state = "done";
  card.dataset.action = r.action;
  card.dataset.angle = String(r.angle);
  card.dataset.confidence = String(r.confidence);
  const body = card.querySelector(".body");
  body.append(
    el("div", { class: "pair" },
      r.before_error ? el("p", { textContent: r.before_error }) : picture(`${base}/before`, "before"),
      r.after_error ? el("p", { textContent: r.after_error }) : picture(`${base}/after`, "after")),
    el("p", { class: `what ${r.action}`, textContent: r.what }),
    el("p", { class: "numbers" },
      "tilt ", el("span", { class: "angle", textContent: r.angle.toFixed(2) }), "\u00b0, confidence ",
      el("span", { class: "confidence", textContent: r.confidence.toFixed(3) })),
    el("p", { class: "reason", textContent: r.reason }),
    el("a", { class: "button download", href: `${base}/download`, download: r.name, textContent: "Download" }));
  $("s-zip").hidden = false;
}

// ---- Predict ----------------------------------------------------------------------------------------------

function checkpoint() {
  return $("p-path").value.trim() || $("p-checkpoint").value;
}

async function predictOne(job) {
  const { file, card, params } = job;
  const problem = tooLarge(file);
  if (problem) throw new Error(problem);
  const r = await send(`/api/${state.session}/predict?${params}`, file);
  card.dataset.index = String(r.index);
  if (r.error) throw new Error(r.error);
  card.dataset.state = "done";
  card.dataset.top = r.predictions[0].label;
  const rows = r.predictions.map((p) => {
    const pct = 100 * p.prob;
    return el("li", { "data-label": p.label, "data-prob": String(p.prob) },
      el("span", { class: "label", textContent: p.label, title: p.label }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `width:${pct.toFixed(1)}%` })),
      el("span", { class: "prob", textContent: `${pct.toFixed(1)}%` }));
  });
  const body = card.querySelector(".body");
  const thumb = el("img", { class: "thumb", alt: file.name, src: URL.createObjectURL(file) });
  thumb.onerror = () => thumb.remove(); // a format the browser cannot show (TIFF): the bars still come
  body.append(thumb, el("ol", { class: "bars" }, ...rows));
}

// ---- wiring -----------------------------------------------------------------------------------------------

function dropZone(prefix, onFiles) {
  const zone = $(`${prefix}-drop`);
  const input = $(`${prefix}-files`);
  input.addEventListener("change", () => { onFiles([...input.files]); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files]);
  });
}

function tabs() {
  for (const button of document.querySelectorAll(".tab")) {
    button.addEventListener("click", () => {
      for (const b of document.querySelectorAll(".tab")) {
        const on = b === button;
        b.setAttribute("aria-selected", String(on));
        $(b.dataset.tab).hidden = !on;
      }
    });
  }
}

async function start() {
  tabs();
  try {
    state.info = await (await fetch("/api/info")).json();
    const r = await fetch("/api/session", { method: "POST" });
    state.session = (await r.json()).session;
  } catch (e) {
    $("status").textContent = `the server cannot be reached: ${e.message}`;
    return;
  }
  const rot = state.info.rotation;
  $("s-range").value = rot.range === "full" ? "full" : rot.range;
  $("s-rule").textContent = `model ${rot.model}; by default it ${rot.rule}.`;
  for (const path of state.info.checkpoints) $("p-checkpoint").append(el("option", { value: path, textContent: path }));
  if (state.info.checkpoints.length) $("p-checkpoint").value = state.info.checkpoints[0];
  $("s-zip").href = `/api/${state.session}/zip`;
  $("s-zip").download = "straightened.zip";

  const straighten = new Batch("s", straightenOne);
  dropZone("s", (files) => {
    const params = straightenParams(); // the options at drop time hold for these files
    straighten.add(files.map((file) => ({ file, params, card: newCard($("s-cards"), file) })));
  });
  const predicting = new Batch("p", predictOne);
  dropZone("p", (files) => {
    const params = new URLSearchParams({ checkpoint: checkpoint(), topk: $("p-topk").value || "5" }).toString();
    predicting.add(files.map((file) => ({ file, params, card: newCard($("p-cards"), file) })));
  });
  $("status").textContent = "ready";
  document.body.dataset.ready = "1";
}

start();
