// The console's shell: the three views behind tabs (the URL's #hash picks one), the key box,
// and one notice line where any view shows an error as a sentence.

import { apiKey, setApiKey } from "./api.js";
import { startChat } from "./chat.js";
import { startLive } from "./live.js";
import { startModels } from "./models.js";

const views = ["chat", "models", "live"];
const notice = document.getElementById("notice");

export function showNotice(message, kind = "error") {
  notice.textContent = message;
  notice.className = kind;
  notice.hidden = !message;
}

function show(view) {
  if (!views.includes(view)) view = "chat";
  for (const v of views) {
    document.getElementById(`view-${v}`).hidden = v !== view;
    document.querySelector(`.tab[data-view="${v}"]`).classList.toggle("active", v === view);
  }
  document.body.dataset.view = view;
  window.dispatchEvent(new CustomEvent("viewchange", { detail: view }));
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    location.hash = tab.dataset.view;
  });
}
window.addEventListener("hashchange", () => show(location.hash.slice(1)));

const key = document.getElementById("api-key");
key.value = apiKey();
key.addEventListener("change", () => {
  setApiKey(key.value.trim());
  showNotice("");
  window.dispatchEvent(new Event("keychange"));
});

startChat(showNotice);
startModels(showNotice);
startLive(showNotice);
show(location.hash.slice(1));
