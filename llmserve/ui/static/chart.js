// A line chart on a <canvas>, drawn by hand: a few series over a shared time axis.

const PAD = { left: 44, right: 10, top: 10, bottom: 22 };

/**
 * series: [{ values: number[], color }]; all of one length, the last value the newest.
 * seconds: how long the x axis spans (for its labels); counts: whole-number ticks.
 */
export function drawChart(canvas, series, seconds, { counts = false } = {}) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const w = width - PAD.left - PAD.right;
  const h = height - PAD.top - PAD.bottom;
  ctx.clearRect(0, 0, width, height);
  const n = Math.max(...series.map((s) => s.values.length), 2);
  const highest = Math.max(1, ...series.flatMap((s) => s.values));
  const top = counts ? 4 * Math.ceil(highest / 4) : niceCeiling(highest);

  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#dde2e8";
  ctx.fillStyle = "#5b6573";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = PAD.top + h - (h * i) / 4;
    ctx.beginPath();
    ctx.moveTo(PAD.left, y);
    ctx.lineTo(PAD.left + w, y);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(formatTick((top * i) / 4), PAD.left - 6, y + 4);
  }
  ctx.textAlign = "left";
  ctx.fillText(`-${Math.round(seconds)} s`, PAD.left, height - 6);
  ctx.textAlign = "right";
  ctx.fillText("now", PAD.left + w, height - 6);

  for (const s of series) {
    if (!s.values.length) continue;
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.values.forEach((v, i) => {
      const x = PAD.left + (w * (n - s.values.length + i)) / (n - 1);
      const y = PAD.top + h - (h * v) / top;
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function niceCeiling(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

function formatTick(v) {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "");
}
