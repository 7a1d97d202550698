// E4T pack front end: tuning progress and last loss on "E4T Personalize", and a visible warning on an
// "E4T Text Encode" node whose text lacks its placeholder. Works with the 2024 and the current front end.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WARN = "#7a3b1e";

function widgetValue(node, name, fallback) {
  const w = node.widgets?.find((w) => w.name === name);
  return w ? w.value : fallback;
}

export function placeholderMissing(node) {
  const placeholder = widgetValue(node, "placeholder", "*s");
  const text = widgetValue(node, "text", "");
  return Boolean(placeholder) && typeof text === "string" && !text.includes(placeholder);
}

function drawLine(node, ctx, text, color) {
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = color;
  ctx.fillText(text, 10, node.size[1] + 16);   // just below the node: the last widget covers its bottom
  ctx.restore();
}

app.registerExtension({
  name: "e4t.ui",
  async setup() {
    api.addEventListener("e4t.tune", ({ detail }) => {
      const node = app.graph?.getNodeById(detail.node);   // ids are numbers (2024) or strings (current)
      if (!node) return;
      node.e4tStatus = `E4T step ${detail.step}/${detail.total} · loss ${Number(detail.loss).toFixed(4)}`;
      node.setDirtyCanvas(true, true);
    });
  },
  async nodeCreated(node) {
    const draw = node.onDrawForeground;
    if (node.comfyClass === "E4TPersonalize") {
      node.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        if (this.e4tStatus && !this.flags?.collapsed) drawLine(this, ctx, this.e4tStatus, "#8fd");
      };
    } else if (node.comfyClass === "E4TTextEncode") {
      node.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        const missing = placeholderMissing(this);
        this.e4tWarning = missing ? `no "${widgetValue(this, "placeholder", "*s")}" in the text: E4T will not change it` : null;
        if (missing !== this.e4tWasMissing) {
          this.e4tWasMissing = missing;
          // The 2024 front end puts node.bgcolor back after each drawNode: change it after this frame.
          queueMicrotask(() => {
            this.bgcolor = missing ? WARN : this.e4tOriginalColor;
            this.setDirtyCanvas?.(true, true);
          });
        }
        if (missing && !this.flags?.collapsed) drawLine(this, ctx, "⚠ " + this.e4tWarning, "#ffb36b");
      };
      node.e4tOriginalColor = node.bgcolor;
      const executed = node.onExecuted;
      node.onExecuted = function (message) {
        executed?.apply(this, arguments);
        if (message?.e4t_warning?.length) this.e4tWarning = message.e4t_warning[0];
      };
    }
  },
});
