// The page of `onestep serve`: Generate (a streamed side-by-side request), latent walks, bench FIDs, throughput.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;
let lastClass = 0;          // the class of the last Generate ("random" resolved by the server)
let lastThroughput = null;  // the rows of the last timing

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function fmtSeconds(s) { return s >= 0.1 ? `${s.toFixed(3)} s` : `${(s * 1000).toFixed(2)} ms`; }
function fmt(v, d = 1) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }

async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                               body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function setStatus(text) { $("status").textContent = text; }

// ---- panels --------------------------------------------------------------------------------------------
function buildPanels(panels) {
  const box = $("panels");
  box.replaceChildren();
  for (const p of panels) {
    const img = el("img", { class: "pix", id: `img-${p.key}`, alt: p.label, "data-frames": "0", "data-done": "0" });
    const panel = el("div", { class: "panel", id: `panel-${p.key}`, "data-key": p.key },
      el("h3", { text: p.label }), img,
      el("div", { class: "progress" }, el("div", { id: `progress-${p.key}` })),
      el("div", { class: "meta" },
        el("div", {}, "latency ", el("span", { class: "latency", id: `latency-${p.key}`, text: "-" })),
        el("div", {}, "speed-up vs teacher ", el("span", { class: "speedup", id: `speedup-${p.key}`, text: "-" })),
        el("div", { class: "muted" }, `method ${p.method}, ${p.steps} step${p.steps > 1 ? "s" : ""}`)));
    box.append(panel);
  }
}

function renderFids() {
  const k = Number($("k").value || 0);
  const want = ["teacher", "dd1-1step", "mapkd-1step", "dd2-1step"];
  const multi = INFO.multi_row ? `${INFO.multi_row}${k + 1}step` : null;
  if (k > 0 && multi) want.push(multi);
  const rows = INFO.fids.rows.filter((r) => want.includes(r.method));
  const body = $("fids").querySelector("tbody");
  body.replaceChildren(...rows.map((r) => el("tr", {},
    el("td", { text: r.method }), el("td", { text: r.steps }), el("td", { text: fmt(r.fid_classifier) }),
    el("td", { text: fmt(r.fid_classifier_10000) }), el("td", { text: fmt(r.fid_inception) }))));
  if (k > 0 && multi && !rows.some((r) => r.method === multi)) {
    body.append(el("tr", {}, el("td", { text: multi }), el("td", { text: k + 1 }),
      el("td", { text: "not in the bench", colspan: "3" })));
  }
  $("fid-source").textContent = rows.length
    ? `From ${INFO.fids.source} (commit ${INFO.fids.commit}): the bench's own runs, at 2,000 / 10,000 samples.`
    : `No bench table at ${INFO.fids.source}.`;
}

// ---- Generate ------------------------------------------------------------------------------------------
async function generate() {
  const cls = $("class").value;
  const body = { class: cls === "random" ? "random" : Number(cls), seed: Number($("seed").value) };
  if (INFO.k_max > 0) body.k = Number($("k").value);
  $("generate").disabled = true;
  document.body.dataset.state = "generating";
  setStatus("generating…");
  const frames = new Set();
  try {
    const r = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
    if (!r.ok) throw new Error((await r.json()).error || `HTTP ${r.status}`);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) handle(JSON.parse(line), frames);
      }
    }
  } catch (e) {
    setStatus(`error: ${e.message}`);
    document.body.dataset.state = "error";
  } finally {
    $("generate").disabled = false;
  }
}

function handle(ev, frames) {
  if (ev.type === "start") {
    buildPanels(ev.panels);
    lastClass = ev.class;
    setStatus(`class ${ev.class} (${ev.class_name})${ev.random_class ? ", drawn at random" : ""}, seed ${ev.seed}`);
  } else if (ev.type === "frame") {
    const img = $(`img-${ev.key}`);
    img.src = ev.image;
    frames.add(ev.image);
    img.dataset.frames = String(Number(img.dataset.frames) + 1);
    img.dataset.distinct = String(frames.size);
    $(`progress-${ev.key}`).style.width = `${(100 * ev.step) / ev.of}%`;
    $(`latency-${ev.key}`).textContent = `step ${ev.step} / ${ev.of}…`;
  } else if (ev.type === "image") {
    const img = $(`img-${ev.key}`);
    img.src = ev.image;
    if (ev.key === "teacher") {
      frames.add(ev.image);
      img.dataset.frames = String(Number(img.dataset.frames) + 1);
      img.dataset.distinct = String(frames.size);
    }
    img.dataset.done = "1";
    $(`progress-${ev.key}`).style.width = "100%";
    const lat = $(`latency-${ev.key}`);
    lat.textContent = fmtSeconds(ev.latency_s);
    lat.dataset.value = String(ev.latency_s);
  } else if (ev.type === "done") {
    for (const [key, s] of Object.entries(ev.speedup)) {
      const sp = $(`speedup-${key}`);
      if (s === null) { sp.textContent = "no teacher served"; continue; }
      sp.textContent = key === "teacher" ? "1.0x (reference)" : `${s.toFixed(1)}x`;
      sp.dataset.value = String(s);
    }
    document.body.dataset.state = "done";
    setStatus(`${$("status").textContent}: done`);
    redrawWalks();
  } else if (ev.type === "error") {
    setStatus(`error: ${ev.error}`);
    document.body.dataset.state = "error";
  }
}

// ---- latent walk ---------------------------------------------------------------------------------------
const walkState = {};  // key -> {busy, pending}

function buildWalks() {
  const box = $("walks");
  box.replaceChildren();
  if (!INFO.one_step.length) box.append(el("p", { class: "muted", text: "no one-step generator is served" }));
  for (const key of INFO.one_step) {
    const seed = Number($("seed").value);
    const w = el("div", { class: "walk", id: `walk-${key}` },
      el("h3", { text: INFO.labels[key] || key }),
      el("img", { class: "pix", id: `walk-img-${key}`, alt: `${key} latent walk`, "data-draws": "0" }),
      el("input", { type: "range", id: `slider-${key}`, min: "0", max: "100", value: "0", step: "1" }),
      el("div", { class: "small" }, "seed A ", el("input", { type: "number", id: `walk-a-${key}`, min: "0",
        value: String(seed) }), " B ", el("input", { type: "number", id: `walk-b-${key}`, min: "0",
        value: String(seed + 1) })),
      el("div", { class: "small muted" }, "t = ", el("span", { id: `walk-t-${key}`, text: "0.00" }), ", ",
        el("span", { class: "latency", id: `walk-latency-${key}`, text: "-" })));
    box.append(w);
    walkState[key] = { busy: false, pending: false };
    $(`slider-${key}`).addEventListener("input", () => drawWalk(key));
    $(`walk-a-${key}`).addEventListener("change", () => drawWalk(key));
    $(`walk-b-${key}`).addEventListener("change", () => drawWalk(key));
  }
}

async function drawWalk(key) {
  const st = walkState[key];
  if (st.busy) { st.pending = true; return; }  // redraw with the latest value once the one in flight returns
  st.busy = true;
  try {
    do {
      st.pending = false;
      const t = Number($(`slider-${key}`).value) / 100;
      const body = { method: key, class: lastClass, t,
                     seed_a: Number($(`walk-a-${key}`).value), seed_b: Number($(`walk-b-${key}`).value) };
      const r = await postJSON("/api/walk", body);
      const img = $(`walk-img-${key}`);
      img.src = r.image;
      img.dataset.draws = String(Number(img.dataset.draws) + 1);
      img.dataset.t = String(r.t);
      $(`walk-t-${key}`).textContent = r.t.toFixed(2);
      $(`walk-latency-${key}`).textContent = fmtSeconds(r.latency_s);
    } while (st.pending);
  } catch (e) {
    $(`walk-latency-${key}`).textContent = `error: ${e.message}`;
  } finally {
    st.busy = false;
  }
}

function redrawWalks() {
  for (const key of INFO.one_step) {
    $(`walk-a-${key}`).value = $("seed").value;
    $(`walk-b-${key}`).value = String(Number($("seed").value) + 1);
    drawWalk(key);
  }
}

// ---- throughput ----------------------------------------------------------------------------------------
async function runThroughput() {
  $("throughput").disabled = true;
  $("tp-status").textContent = "timing… (a few seconds)";
  try {
    const body = INFO.k_max > 0 ? { k: Number($("k").value) } : {};
    const r = await postJSON("/api/throughput", body);
    lastThroughput = r.rows;
    $("tp-status").textContent = `measured in ${r.wall_s.toFixed(1)} s, ${r.machine.torch_threads} torch thread(s)`;
    renderThroughput();
  } catch (e) {
    $("tp-status").textContent = `error: ${e.message}`;
  } finally {
    $("throughput").disabled = false;
  }
}

function costPerMillion(imagesPerSecond, price) {
  return (price * 1e6) / (imagesPerSecond * 3600);
}

function renderThroughput() {
  if (!lastThroughput) return;
  const price = Math.max(0, Number($("price").value) || 0);
  const body = $("tp-table").querySelector("tbody");
  body.replaceChildren(...lastThroughput.map((r) => el("tr", { "data-key": r.key },
    el("td", { text: r.label }), el("td", { text: r.steps }),
    el("td", { class: "ips", text: fmt(r.throughput_b1, 1) }), el("td", { class: "ips", text: fmt(r.throughput_b64, 1) }),
    el("td", { text: r.speedup_b64 ? `${r.speedup_b64.toFixed(1)}x` : "-" }),
    el("td", { text: `${costPerMillion(r.throughput_b1, price).toFixed(2)}` }),
    el("td", { text: `${costPerMillion(r.throughput_b64, price).toFixed(2)}` }))));
}

// ---- start ---------------------------------------------------------------------------------------------
async function init() {
  INFO = await (await fetch("/api/info")).json();
  const sel = $("class");
  INFO.classes.forEach((name, i) => sel.append(el("option", { value: String(i), text: `${i}: ${name}` })));
  $("seed").max = String(INFO.seed_max);
  const k = $("k");
  for (let i = 1; i <= INFO.k_max; i++) k.append(el("option", { value: String(i), text: String(i) }));
  if (INFO.k_max > 0) k.value = String(INFO.k_default); else $("k-label").hidden = true;
  if (INFO.missing.length) {
    $("missing").hidden = false;
    $("missing").textContent = `Not served (not shipped in assets/fashion-mnist and not given with --run): ` +
      INFO.missing.join(", ") + ".";
  }
  $("machine").textContent = `machine: ${INFO.machine.cpu} (${INFO.machine.cpu_count} cores), torch ` +
    `${INFO.machine.torch}${INFO.machine.cuda ? ", " + INFO.machine.cuda : ""}`;
  buildPanels(INFO.panels);
  buildWalks();
  renderFids();
  k.addEventListener("change", renderFids);
  $("generate").addEventListener("click", generate);
  $("dice").addEventListener("click", () => { $("seed").value = String(Math.floor(Math.random() * 100000)); });
  $("throughput").addEventListener("click", runThroughput);
  $("price").addEventListener("input", renderThroughput);
  setStatus("ready");
  document.body.dataset.state = "ready";
}

init().catch((e) => { setStatus(`error: ${e.message}`); document.body.dataset.state = "error"; });
