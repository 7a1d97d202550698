// E4T pack front end: tuning progress and last loss on "E4T Personalize", and a visible warning on an
// "E4T Text Encode" node whose text lacks its placeholder. Both are shown in a read-only widget, which
// the canvas renderer and the Vue node renderer ("Nodes 2.0", where custom canvas drawing never runs)
// both display; works with the 2024 and the current front end.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WARN = "#7a3b1e";
const STATUS = "e4t_status";   // our display widget: never serialised, never sent to the server

function widgetValue(node, name, fallback) {
  const w = node.widgets?.find((w) => w.name === name);
  return w ? w.value : fallback;
}

export function placeholderMissing(node) {
  const placeholder = widgetValue(node, "placeholder", "*s");
  const text = widgetValue(node, "text", "");
  return Boolean(placeholder) && typeof text === "string" && !text.includes(placeholder);
}

// Shows `text` (the 2024 canvas draws at most 30 characters) in the node's status widget, added last so
// the node's own widget values keep their places; `null` removes it and gives the node its height back.
function showStatus(node, label, text) {
  let w = node.widgets?.find((w) => w.name === STATUS);
  const [width, height] = node.size;
  if (text === null) {
    if (!w) return;
    if (node.removeWidget) node.removeWidget(w);
    else node.widgets.splice(node.widgets.indexOf(w), 1);
    node.setSize([width, node.e4tHeight ?? height]);
  } else if (!w) {
    node.e4tHeight = height;
    // Read-only: Vue renders `read_only` so; the canvas prompts for a new value, which the callback undoes.
    // (`disabled` would do on the 2024 canvas, but current canvases draw no value for disabled widgets.)
    w = node.addWidget("text", STATUS, text, () => { w.value = node.e4tShown; },
                       { serialize: false, read_only: true });
    Object.assign(w, { label, serialize: false });
    node.setSize([width, Math.max(height, node.computeSize()[1])]);
  } else if (w.value === text) {
    return;
  } else {
    w.value = text;
  }
  node.e4tShown = text;
  node.setDirtyCanvas?.(true, true);
}

function checkPlaceholder(node) {
  const missing = placeholderMissing(node);
  const placeholder = widgetValue(node, "placeholder", "*s");
  if (missing === node.e4tWasMissing) return;
  node.e4tWasMissing = missing;
  // Not while a frame is drawn: the 2024 front end puts node.bgcolor back after each drawNode.
  queueMicrotask(() => {
    node.bgcolor = missing ? WARN : node.e4tOriginalColor;
    showStatus(node, "⚠ E4T", missing ? `no ${placeholder} in the text` : null);
  });
}

app.registerExtension({
  name: "e4t.ui",
  async setup() {
    api.addEventListener("e4t.tune", ({ detail }) => {
      const node = app.graph?.getNodeById(detail.node);   // ids are numbers (2024) or strings (current)
      if (!node) return;
      showStatus(node, "E4T tune", `step ${detail.step}/${detail.total} · loss ${Number(detail.loss).toFixed(4)}`);
    });
  },
  async nodeCreated(node) {
    if (node.comfyClass !== "E4TTextEncode" && node.comfyClass !== "E4TPersonalize") return;
    const serialize = node.onSerialize;
    node.onSerialize = function (o) {   // the 2024 front end saves every widget's value: not ours
      serialize?.apply(this, arguments);
      const i = this.widgets?.findIndex((w) => w.name === STATUS) ?? -1;
      if (i >= 0 && o.widgets_values?.length > i) o.widgets_values.length = i;
    };
    if (node.comfyClass !== "E4TTextEncode") return;
    node.e4tOriginalColor = node.bgcolor;
    // The text is checked when a widget reports a change (Vue nodes, single-line widgets) and on every
    // canvas frame (the 2024 multiline widget reports none).
    for (const w of node.widgets ?? []) {
      const callback = w.callback;
      w.callback = function () {
        const result = callback?.apply(this, arguments);
        checkPlaceholder(node);
        return result;
      };
    }
    const draw = node.onDrawForeground;
    node.onDrawForeground = function () {
      draw?.apply(this, arguments);
      checkPlaceholder(this);
    };
    setTimeout(() => checkPlaceholder(node));   // once the loaded workflow has set the text
    const executed = node.onExecuted;
    node.onExecuted = function (message) {   // the text as it ran (dynamic prompts, a text input) may differ
      executed?.apply(this, arguments);
      if (message?.e4t_warning?.length) {
        showStatus(this, "⚠ E4T", `no ${widgetValue(this, "placeholder", "*s")} in the text run`);
      } else if (!this.e4tWasMissing) {
        showStatus(this, "⚠ E4T", null);
      }
    };
  },
});
