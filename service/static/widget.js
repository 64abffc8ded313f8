/*
 * Visual product search: the "similar products" widget for a storefront.
 *
 *   <script src="https://search.example/widget.js" async></script>
 *   <div data-similar-sku="SKU" data-k="8"></div>
 *   <div data-similar-sku="SKU" data-q="leather"></div>   (data-q: words that count too)
 *   <div data-like="SKU-1,SKU-2" data-unlike="SKU-3" data-k="8"></div>   (more like these, less like those)
 *
 * Fills every such div (also ones added later) with a row of similar products from
 * GET <api>/api/products/<sku>/similar, or for a data-like list of skus (comma-separated) with a row of
 * recommendations from POST <api>/api/recommend, on the script's own origin (or the data-api attribute of
 * the script or the div). No dependencies; all text goes in through textContent. An unknown sku, an error
 * or an unreachable service leave the div empty, without a console error from the widget.
 * Class names: vps-row, vps-card, vps-link, vps-image, vps-title, vps-price; the div gets
 * data-similar-state="loading" | "loaded" | "empty".
 */
(function () {
  "use strict";

  var SKU_ATTRIBUTE = "data-similar-sku";
  var LIKE_ATTRIBUTE = "data-like";
  var UNLIKE_ATTRIBUTE = "data-unlike";
  // What a div is filled from: a change to any of them fills it again.
  var WATCHED = [SKU_ATTRIBUTE, LIKE_ATTRIBUTE, UNLIKE_ATTRIBUTE, "data-k", "data-q", "data-api"];
  var SELECTOR = "[" + SKU_ATTRIBUTE + "],[" + LIKE_ATTRIBUTE + "]";
  var STYLE_ID = "vps-similar-style";
  // :where() gives these rules no specificity, so any class rule of the shop overrides them.
  var CSS =
    ":where(.vps-row){display:flex;gap:12px;overflow-x:auto;padding:4px 0;margin:0}" +
    ":where(.vps-card){flex:0 0 150px;box-sizing:border-box;border:1px solid #e3e3e3;border-radius:6px;" +
    "background:#fff;font:14px/1.3 system-ui,sans-serif}" +
    ":where(.vps-link){display:block;padding:8px;color:inherit;text-decoration:none}" +
    ":where(.vps-image){display:block;width:100%;aspect-ratio:1;object-fit:contain;background:#fafafa}" +
    ":where(.vps-title){margin-top:6px;font-weight:600;overflow-wrap:anywhere}" +
    ":where(.vps-price){margin-top:2px;color:#555}";

  // Captured now: document.currentScript is only set while the script first runs (async included).
  var script = document.currentScript;
  var defaultBase = baseOf(script);
  var rendered = new WeakMap(); // div -> the skus, k, words and data-api it was last filled for

  function baseOf(element) {
    try {
      var api = element && element.getAttribute("data-api");
      if (api) {
        return new URL(api.replace(/\/?$/, "/"), document.baseURI).href;
      }
      if (element && element.src) {
        return new URL(".", element.src).href; // the folder widget.js was served from
      }
    } catch (ignored) {
      // a malformed data-api: fall through to the page's own origin
    }
    return new URL("/", document.baseURI).href;
  }

  function similarUrl(base, sku, k, q) {
    // Skus may contain '/': encode each path segment, keep the slashes.
    var path = sku.split("/").map(encodeURIComponent).join("/");
    // unknown=empty: an unknown sku answers 200 with no results, so the browser logs no failed request.
    var query = "?unknown=empty" + (k ? "&k=" + k : "") + (q && q.trim() ? "&q=" + encodeURIComponent(q) : "");
    return new URL("api/products/" + path + "/similar" + query, base).href;
  }

  function skuList(element, name) {
    // Comma-separated skus, each trimmed; empty ones dropped.
    return (element.getAttribute(name) || "")
      .split(",")
      .map(function (sku) {
        return sku.trim();
      })
      .filter(function (sku) {
        return sku;
      });
  }

  function ask(element, base, k) {
    var q = element.getAttribute("data-q");
    var like = skuList(element, LIKE_ATTRIBUTE);
    if (!like.length) {
      return fetch(similarUrl(base, element.getAttribute(SKU_ATTRIBUTE), k, q), { mode: "cors", credentials: "omit" });
    }
    // unknown=ignore: a sku no longer in the catalog is left out, so the browser logs no failed request.
    var body = { like: like, unlike: skuList(element, UNLIKE_ATTRIBUTE), unknown: "ignore" };
    if (k) {
      body.k = k;
    }
    if (q && q.trim()) {
      body.q = q;
    }
    return fetch(new URL("api/recommend", base).href, {
      method: "POST",
      mode: "cors",
      credentials: "omit",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body)
    });
  }

  function safeLink(url, base) {
    // Only http(s) links: a catalog url like "javascript:..." must not become clickable.
    try {
      var resolved = new URL(url, base);
      return resolved.protocol === "http:" || resolved.protocol === "https:" ? resolved.href : null;
    } catch (ignored) {
      return null;
    }
  }

  function addStyle() {
    if (document.getElementById(STYLE_ID) || !document.head) {
      return;
    }
    var style = document.createElement("style");
    style.id = STYLE_ID;
    style.textContent = CSS;
    // First in <head>, so the shop's own stylesheets come later in the cascade.
    document.head.insertBefore(style, document.head.firstChild);
  }

  function card(result, base) {
    var item = document.createElement("div");
    item.className = "vps-card";
    var link = document.createElement("a");
    link.className = "vps-link";
    var href = (result.url && safeLink(result.url, base)) || safeLink(result.product_url, base);
    if (href) {
      link.href = href;
    }
    var title = typeof result.title === "string" ? result.title : String(result.sku);
    var image = safeLink(result.image_url, base);
    if (image) {
      var img = document.createElement("img");
      img.className = "vps-image";
      img.loading = "lazy";
      img.alt = title;
      img.src = image;
      link.appendChild(img);
    }
    var name = document.createElement("div");
    name.className = "vps-title";
    name.textContent = title;
    link.appendChild(name);
    if (typeof result.price === "number" && isFinite(result.price)) {
      var price = document.createElement("div");
      price.className = "vps-price";
      price.textContent = result.price.toFixed(2);
      link.appendChild(price);
    }
    item.appendChild(link);
    return item;
  }

  function show(element, key, base, results) {
    if (currentKey(element) !== key) {
      return; // the div changed sku or k while this request was out
    }
    while (element.firstChild) {
      element.removeChild(element.firstChild);
    }
    if (!results.length) {
      element.setAttribute("data-similar-state", "empty");
      return;
    }
    var row = document.createElement("div");
    row.className = "vps-row";
    for (var i = 0; i < results.length; i++) {
      if (results[i] && typeof results[i] === "object") {
        row.appendChild(card(results[i], base));
      }
    }
    element.appendChild(row);
    element.setAttribute("data-similar-state", "loaded");
  }

  function currentKey(element) {
    var parts = WATCHED.map(function (name) {
      return element.getAttribute(name) || "";
    });
    return parts.join("\n");
  }

  function fill(element) {
    var key = currentKey(element);
    var named = element.getAttribute(SKU_ATTRIBUTE) || skuList(element, LIKE_ATTRIBUTE).length;
    if (!named || rendered.get(element) === key) {
      return;
    }
    rendered.set(element, key);
    var base = element.hasAttribute("data-api") ? baseOf(element) : defaultBase;
    var k = parseInt(element.getAttribute("data-k"), 10);
    element.setAttribute("data-similar-state", "loading");
    addStyle();
    ask(element, base, k > 0 ? Math.min(k, 100) : 0)
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(
        function (body) {
          show(element, key, base, body && Array.isArray(body.results) ? body.results : []);
        },
        function () {
          show(element, key, base, []); // the service is down or refused: show nothing
        }
      );
  }

  function scan(root) {
    if (root.nodeType !== 1 && root.nodeType !== 9) {
      return;
    }
    if (root.nodeType === 1 && root.matches(SELECTOR)) {
      fill(root);
    }
    var found = root.querySelectorAll(SELECTOR);
    for (var i = 0; i < found.length; i++) {
      fill(found[i]);
    }
  }

  function start() {
    scan(document);
    if (typeof MutationObserver !== "function") {
      return;
    }
    // Divs that a shop's own scripts add later, or whose skus or k they change.
    new MutationObserver(function (mutations) {
      for (var i = 0; i < mutations.length; i++) {
        var mutation = mutations[i];
        if (mutation.type === "attributes") {
          scan(mutation.target);
        }
        for (var j = 0; j < mutation.addedNodes.length; j++) {
          scan(mutation.addedNodes[j]);
        }
      }
    }).observe(document.documentElement, {
      childList: true,
      subtree: true,
      attributes: true,
      attributeFilter: WATCHED
    });
  }

  if (typeof fetch !== "function") {
    return; // a very old browser: leave the page as it is
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
