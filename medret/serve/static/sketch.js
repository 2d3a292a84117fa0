// The "Sketch" tab: draw a lesion on a template level, find the patients with such a lesion there.
// Loaded by index.html; builds its own view (#sketch-view) and shows it when the page's hash is #sketch.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const COLOURS = ["#ff3b30", "#ffcc00", "#34c759", "#0a84ff"];
  const SCALE = 2;  // screen pixels per template millimetre
  let templates = [];
  let current = null;  // the chosen table's template entry
  let layers = {};  // class -> canvas at box resolution (alpha = lesion)
  let polygon = [];
  let painting = false;

  const view = document.createElement("main");
  view.id = "sketch-view";
  view.className = "hidden";
  view.innerHTML = `
  <div>
    <form id="sketch-form">
      <label>Table <select id="sketch-table"></select></label>
      <div id="sketch-count" class="muted"></div>
      <label>Level <span id="sketch-level-text"></span>
        <input id="sketch-level" type="range" min="0" max="0" value="0"></label>
      <label>Lesion class <select id="sketch-class"></select></label>
      <label>Tool <select id="sketch-tool">
        <option value="brush">brush</option><option value="polygon">polygon (click points, then close)</option>
        <option value="eraser">eraser</option></select></label>
      <label>Brush size (mm) <input id="sketch-size" type="number" min="1" max="40" value="8"></label>
      <label><input id="sketch-regions" type="checkbox" style="width:auto"> region outlines</label>
      <button id="sketch-close" type="button">Close polygon</button>
      <button id="sketch-clear" type="button">Clear</button>
      <label>Patients (k) <input id="sketch-k" type="number" min="1" max="100" value="10"></label>
      <button id="sketch-go" type="submit">Search</button>
    </form>
    <div id="sketch-query" class="muted"></div>
  </div>
  <section>
    <div id="sketch-status"></div>
    <div id="sketch-stage" style="position:relative;display:inline-block;background:#000;border-radius:6px">
      <img id="sketch-template" alt="template slice" style="display:block;image-rendering:pixelated">
      <canvas id="sketch-canvas" style="position:absolute;left:0;top:0;cursor:crosshair"></canvas>
    </div>
    <div id="sketch-grid" style="display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem;margin-top:1rem"></div>
  </section>`;
  document.body.insertBefore(view, document.querySelector("script"));

  function headers() {
    const t = ($("token") && $("token").value) || localStorage.getItem("medret-token") || "";
    return t ? { Authorization: "Bearer " + t } : {};
  }
  function say(text, error) { $("sketch-status").textContent = text; $("sketch-status").className = error ? "error" : ""; }
  async function detail(r) {
    try { const j = await r.json(); return typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); }
    catch (e) { return r.status + " " + r.statusText; }
  }

  function show() {
    const on = location.hash === "#sketch";
    view.classList.toggle("hidden", !on);
    $("tab-sketch").classList.toggle("on", on);
    if (on) {
      for (const v of ["images", "slides"]) { $(v + "-view").classList.add("hidden"); $("tab-" + v).classList.remove("on"); }
      if (!templates.length) load();
    }
  }

  async function load() {
    say("Loading templates…");
    try {
      const r = await fetch("/v1/templates", { headers: headers() });
      if (!r.ok) throw new Error(await detail(r));
      templates = (await r.json()).templates;
      const sel = $("sketch-table");
      sel.innerHTML = "";
      for (const t of templates) {
        const o = document.createElement("option"); o.value = t.table;
        o.textContent = `${t.table} (${t.template})`; sel.append(o);
      }
      if (!templates.length) { say("No table has lesion masks: no volume is sketch-searchable yet.", true); return; }
      choose(templates[0].table);
    } catch (e) { say("Could not load templates: " + e.message, true); }
  }

  function choose(table) {
    current = templates.find((t) => t.table === table);
    const [h, w] = current.box_px;
    $("sketch-count").textContent =
      `${current.patients} patients are sketch-searchable (${current.lesion_slices} lesion slices); ` +
      `volumes without a lesion mask are not.`;
    $("sketch-level").max = current.levels.length - 1;
    $("sketch-level").value = Math.floor(current.levels.length / 2);
    const cls = $("sketch-class"); cls.innerHTML = "";
    for (const c of current.classes) { const o = document.createElement("option"); o.value = c; o.textContent = c; cls.append(o); }
    layers = {};
    for (const c of current.classes) { const cv = document.createElement("canvas"); cv.width = w; cv.height = h; layers[c] = cv; }
    const canvas = $("sketch-canvas");
    canvas.width = w * SCALE; canvas.height = h * SCALE;
    $("sketch-template").width = w * SCALE; $("sketch-template").height = h * SCALE;
    level();
    say(`Draw a lesion, then search. Box ${w}x${h} mm, grid ${current.grid}x${current.grid}.`);
  }

  async function level() {
    const lv = current.levels[+$("sketch-level").value];
    $("sketch-level-text").textContent = `${lv.level} (z ${lv.z_mm} mm)`;
    const url = lv.png_url + ($("sketch-regions").checked ? "?regions=true" : "");
    const r = await fetch(url, { headers: headers() });
    if (r.ok) $("sketch-template").src = URL.createObjectURL(await r.blob());
  }

  function redraw() {
    const canvas = $("sketch-canvas");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = false;
    current.classes.forEach((c, i) => {
      const tmp = document.createElement("canvas"); tmp.width = layers[c].width; tmp.height = layers[c].height;
      const t = tmp.getContext("2d");
      t.drawImage(layers[c], 0, 0);
      t.globalCompositeOperation = "source-in"; t.fillStyle = COLOURS[i % COLOURS.length];
      t.fillRect(0, 0, tmp.width, tmp.height);
      ctx.globalAlpha = 0.55; ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height); ctx.globalAlpha = 1;
    });
    if (polygon.length) {
      ctx.strokeStyle = "#fff"; ctx.beginPath();
      polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x * SCALE, y * SCALE) : ctx.moveTo(x * SCALE, y * SCALE)));
      ctx.stroke();
    }
  }

  function at(e) {
    const b = $("sketch-canvas").getBoundingClientRect();
    return [(e.clientX - b.left) / SCALE, (e.clientY - b.top) / SCALE];
  }
  function dab(x, y) {
    const ctx = layers[$("sketch-class").value].getContext("2d");
    ctx.globalCompositeOperation = $("sketch-tool").value === "eraser" ? "destination-out" : "source-over";
    ctx.fillStyle = "#fff"; ctx.beginPath(); ctx.arc(x, y, (+$("sketch-size").value || 8) / 2, 0, 2 * Math.PI); ctx.fill();
    ctx.globalCompositeOperation = "source-over";
  }
  function closePolygon() {
    if (polygon.length < 3) { say("A polygon needs at least 3 points.", true); return; }
    const ctx = layers[$("sketch-class").value].getContext("2d");
    ctx.fillStyle = "#fff"; ctx.beginPath();
    polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath(); ctx.fill();
    polygon = []; redraw();
  }

  function drawn(c) {
    const cv = layers[c];
    const a = cv.getContext("2d").getImageData(0, 0, cv.width, cv.height).data;
    for (let i = 3; i < a.length; i += 4) if (a[i]) return true;
    return false;
  }

  async function search() {
    const masks = {};
    for (const c of current.classes) if (drawn(c)) masks[c] = { png: layers[c].toDataURL("image/png") };
    if (!Object.keys(masks).length) { say("Draw a lesion first.", true); return; }
    const body = { table: current.table, level: +$("sketch-level").value, masks, k: +$("sketch-k").value || 10 };
    say("Searching…");
    try {
      const r = await fetch("/v1/sketch/search", {
        method: "POST", body: JSON.stringify(body), headers: { ...headers(), "Content-Type": "application/json" },
      });
      if (!r.ok) throw new Error(await detail(r));
      render(await r.json());
    } catch (e) { say(e.message, true); }
  }

  function render(data) {
    const grid = $("sketch-grid");
    grid.innerHTML = "";
    for (const h of data.results) {
      const card = document.createElement("div");
      card.className = "hit sketch-hit"; card.dataset.patient = h.patient;
      const img = document.createElement("img"); img.alt = h.patient; img.src = h.thumbnail; card.append(img);
      const top = Object.entries(h.regions).sort((a, b) => b[1] - a[1])[0];
      for (const [cls, text] of [
        ["d", `#${h.rank} · Dice ${h.dice.toFixed(3)}`],
        ["", h.patient],
        ["muted", `level ${h.level} (z ${h.level_mm.toFixed(0)} mm) · ${h.hemisphere}${top ? " · " + top[0] : ""}`],
      ]) { const d = document.createElement("div"); d.className = cls; d.textContent = text; card.append(d); }
      grid.append(card);
    }
    const q = $("sketch-query"); q.innerHTML = "";
    for (const [c, s] of Object.entries(data.query)) {
      const d = document.createElement("div"); d.textContent = `query ${c}: ${s.bits} cells`;
      const img = document.createElement("img"); img.src = s.png; img.alt = "rasterised query " + c;
      img.style.width = "120px"; img.style.imageRendering = "pixelated"; img.style.background = "#000";
      q.append(d, img);
    }
    say(`${data.results.length} of ${data.patients_searchable} sketch-searchable patients ` +
        `(${data.candidates} slices scored) in ${data.timings_ms.total.toFixed(1)} ms`);
  }

  const canvas = $("sketch-canvas");
  canvas.addEventListener("mousedown", (e) => {
    const [x, y] = at(e);
    if ($("sketch-tool").value === "polygon") { polygon.push([x, y]); redraw(); return; }
    painting = true; dab(x, y); redraw();
  });
  canvas.addEventListener("mousemove", (e) => { if (painting) { const [x, y] = at(e); dab(x, y); redraw(); } });
  window.addEventListener("mouseup", () => { painting = false; });
  canvas.addEventListener("dblclick", () => { if ($("sketch-tool").value === "polygon") closePolygon(); });
  $("sketch-close").onclick = closePolygon;
  $("sketch-clear").onclick = () => {
    for (const c of Object.keys(layers)) layers[c].getContext("2d").clearRect(0, 0, layers[c].width, layers[c].height);
    polygon = []; redraw();
  };
  $("sketch-level").addEventListener("input", level);
  $("sketch-regions").onchange = level;
  $("sketch-table").onchange = () => choose($("sketch-table").value);
  $("sketch-form").onsubmit = (e) => { e.preventDefault(); search(); };
  window.addEventListener("hashchange", show);
  show();
})();
