// Renders the formulas that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \] inside
// .arithmatex elements, with the bundled KaTeX. document$ is Material's page observable (also fires on
// instant navigation); plain DOMContentLoaded otherwise.
function renderMath() {
  document.querySelectorAll(".arithmatex").forEach(function (el) {
    var tex = el.textContent.trim();
    var display = el.tagName === "DIV" || tex.startsWith("\\[");
    tex = tex.replace(/^\\[\[(]/, "").replace(/\\[\])]$/, "");
    katex.render(tex, el, { displayMode: display, throwOnError: false });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMath);
} else {
  document.addEventListener("DOMContentLoaded", renderMath);
}
