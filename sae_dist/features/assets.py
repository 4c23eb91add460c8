"""The dashboard's stylesheet and index page (search runs in the page over the embedded feature list)."""

STYLE_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2em 2em; color: #1f2937; max-width: 1200px; }
nav { margin-bottom: .6em; } nav a { margin-right: .4em; }
h1 { margin: .2em 0; } h2 { font-size: 1.05em; margin: 1.1em 0 .4em; } h3 { font-size: .95em; color: #6b7280; }
.stats, .dim { color: #6b7280; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; }
.cols ol { margin: 0; padding-left: 1.4em; }
.ctx { font-family: ui-monospace, monospace; font-size: 12.5px; white-space: pre-wrap; padding: 3px 0;
       border-bottom: 1px solid #f3f4f6; }
.ctx .v { display: inline-block; min-width: 7.5em; color: #6b7280; }
.tok.on { border-radius: 2px; } .tok.max { outline: 1px solid #9a3412; }
.hist rect { fill: #ea580c; } .hist text { font-size: 10px; fill: #6b7280; }
table { border-collapse: collapse; } td { padding: 1px 8px 1px 0; font-family: ui-monospace, monospace; }
td.pos { color: #166534; } td.neg { color: #991b1b; }
#search { font-size: 15px; padding: 4px 8px; width: 26em; }
#list td, #list th { text-align: left; padding: 2px 14px 2px 0; }
"""

INDEX_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>SAE features</title>
<link rel="stylesheet" href="style.css"></head><body>
<h1>SAE features</h1>
<p class="stats">%HEADER%</p>
<h2>Feature density</h2>%DENSITY%
<p><input id="search" type="search" placeholder="feature id, or a token it fires on" autofocus>
<span id="count" class="dim"></span></p>
<table id="list"><thead><tr><th>feature</th><th>frequency</th><th>max act</th><th>fires most on</th></tr></thead>
<tbody></tbody></table>
<script>
const FEATURES = %FEATURES%;
const SHOWN = 200;
function esc(s) { return s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function render() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  const hits = FEATURES.filter(([id, freq, max, toks]) =>
    !q || String(id) === q || (isNaN(+q) && toks.toLowerCase().includes(q)));
  document.getElementById("count").textContent =
    hits.length + " of " + FEATURES.length + " features" + (hits.length > SHOWN ? " (first " + SHOWN + " shown)" : "");
  document.querySelector("#list tbody").innerHTML = hits.slice(0, SHOWN).map(([id, freq, max, toks]) =>
    `<tr><td><a class="feature" href="f/${id}.html">${id}</a></td><td>${(100 * freq).toFixed(4)}%</td>` +
    `<td>${max.toFixed(3)}</td><td>${esc(toks)}</td></tr>`).join("");
}
document.getElementById("search").addEventListener("input", render);
render();
</script></body></html>
"""
