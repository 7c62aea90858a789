// The web port's token, for every page it serves. It comes in the fragment (#token=...;
// an old ?token=... is moved once). It is kept for this tab, taken out of the address bar
// at once, and sent only to the page's live socket.
"use strict";
const TOKEN_KEY = "million-token";

function takeToken() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get("token") ?? query.get("token");
  if (given === null) return storedToken();
  query.delete("token");
  fragment.delete("token");
  const search = query.toString(), hash = fragment.toString();
  history.replaceState(history.state, "", location.pathname + (search && `?${search}`) + (hash && `#${hash}`));
  try { sessionStorage.setItem(TOKEN_KEY, given); } catch { /* storage off: this load only */ }
  return given;
}

function storedToken() {
  try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; }
}
