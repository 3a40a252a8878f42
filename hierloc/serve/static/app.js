// The page of `hierloc serve`: send a photo to POST /explain and show the answer. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);

function text(tag, content, className) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (className) node.className = className;
  return node;
}

function pct(p) {
  return (100 * p).toFixed(p >= 0.995 || p < 0.1 ? 1 : 0) + "%";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function reasonItem(reason, level, against) {
  const li = text("li", `${against ? "−" : "+"} ${reason.name}: in the photo ${pct(reason.image_prob)}, ` +
    `${pct(reason.profile_chosen)} of ${level.chosen.name} vs ${pct(reason.profile_other)} of ${level.compared_with}`);
  if (against) li.className = "against";
  if (reason.description) li.title = reason.description;
  return li;
}

function showExplanation(e) {
  const hierarchy = $("hierarchy");
  hierarchy.replaceChildren();
  for (const level of e.levels) {
    const li = document.createElement("li");
    li.className = "level-" + level.level;
    li.append(text("span", level.level + " ", "level"), text("span", level.chosen.name, "entity"),
              text("span", " " + pct(level.chosen.probability), "prob"));
    const bar = text("span", "", "bar");
    bar.style.width = Math.max(2, Math.round(120 * level.chosen.probability)) + "px";
    li.append(bar);
    if (level.runners_up.length) {
      li.append(text("p", "runner-up: " + level.runners_up.map((r) => `${r.name} ${pct(r.probability)}`).join(", "),
                     "runners"));
    }
    const reasons = document.createElement("ul");
    reasons.className = "reasons";
    for (const r of level.supporting) reasons.append(reasonItem(r, level, false));
    for (const r of level.against) reasons.append(reasonItem(r, level, true));
    if (reasons.children.length) li.append(reasons);
    hierarchy.append(li);
  }
  const concepts = $("concepts");
  concepts.replaceChildren();
  if (!e.concepts_available) {
    concepts.append(text("li", "this model has no concept head: no concepts to show"));
  }
  for (const c of e.image_concepts) concepts.append(text("li", `${c.name} ${pct(c.probability)}`, "concept"));
  const alternatives = $("alternatives");
  alternatives.replaceChildren();
  for (const a of e.alternatives) alternatives.append(text("li", a.names.join(" › ")));
  const radius = $("radius");
  if (e.radius90_km !== null && e.radius90_km !== undefined) {
    radius.textContent = `Within ${Math.round(e.radius90_km).toLocaleString("en")} km of the answer's point with ` +
      "90 % probability (the dashed circle on the map)";
    radius.hidden = false;
  } else {
    radius.hidden = true;
  }
  const exif = $("exif");
  if (e.gps_lat_deg !== null && e.gps_lat_deg !== undefined) {
    exif.textContent = `Position stored in the photo (EXIF GPS): ${e.gps_lat_deg.toFixed(4)}, ` +
      `${e.gps_lon_deg.toFixed(4)}; the answer's point: ${e.lat_deg.toFixed(4)}, ${e.lon_deg.toFixed(4)}`;
    exif.hidden = false;
  } else {
    exif.hidden = true;
  }
  if (e.map_png) $("map").src = e.map_png;
}

// One column (a phone): the map is drawn as wide as the page, so that its text is read at its own size rather
// than shrunk from the server's 900 px. Wider screens take the server's default. The server accepts 300 to 2000.
const ONE_COLUMN = window.matchMedia("(max-width: 800px)");

function mapWidth() {
  if (!ONE_COLUMN.matches) return null;
  const width = document.querySelector("main").clientWidth - 2;   // the map's 1 px border on each side
  return Math.max(300, Math.min(900, Math.floor(width)));
}

async function send(file) {
  $("error").hidden = true;
  $("status").textContent = `Looking at ${file.name}…`;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file, file.name);
  const width = mapWidth();
  if (width) form.append("map_width", String(width));
  let response, body;
  try {
    response = await fetch("/explain", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    showError(`The server did not answer (${err}).`);
    return;
  }
  if (!response.ok) {
    showError(body.error || `The server answered ${response.status}.`);
    return;
  }
  const e = body.explanations[0];
  showExplanation(e);
  $("result").hidden = false;
  $("status").textContent = `${file.name}: ${e.levels.map((l) => l.chosen.name).join(" › ")}`;
}

function choose(files) {
  if (files && files.length) send(files[0]);
}

async function loadModelLine() {
  try {
    const health = await (await fetch("/health")).json();
    const m = health.model;
    const n = m.training && m.training.n_images;
    $("provenance").textContent = `hierloc ${health.version}; model ${m.model_dir} (backbone ${m.backbone}, ` +
      `${m.geometry}${n ? `, trained on ${n} images` : ""}); gazetteer ` +
      Object.entries(health.gazetteer.entities).map(([k, v]) => `${v} ${k}`).join(", ");
  } catch (err) {
    $("provenance").textContent = "";
  }
}

$("file").addEventListener("change", (event) => choose(event.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files);
});
drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("file").click(); });
loadModelLine();
