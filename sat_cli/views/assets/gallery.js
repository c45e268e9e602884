/* sat gallery: pages of images load on demand (script tags, so it works from file://).
   Every caption, word and path is inserted with textContent: nothing from the data becomes markup. */
(function () {
  "use strict";
  var SAT = (window.SAT = { pages: {}, meta: null, current: 0 });
  var grid, pageInfo, pageInput;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function pad(n) { return ("0000" + n).slice(-5); }

  function loadScript(src) {
    var s = document.createElement("script");
    s.src = src;
    document.body.appendChild(s);
  }

  SAT.manifest = function (meta) {
    SAT.meta = meta;
    document.getElementById("title").textContent = meta.title;
    document.getElementById("stats").textContent =
      meta.images + " images, " + meta.captioned + " captioned, " + meta.failed + " failed";
    pageInput.max = meta.pages;
    var m = /page=(\d+)/.exec(location.hash);
    go(m ? parseInt(m[1], 10) : 1);
    if (meta.failed) {
      var btn = document.getElementById("show-failures");
      btn.hidden = false;
      btn.onclick = function () { loadScript("data/failed.js"); btn.disabled = true; };
    }
  };

  SAT.page = function (n, records) {
    SAT.pages[n] = records;
    if (n === SAT.current) render(n);
  };

  SAT.failed = function (rows) {
    var box = document.getElementById("failures");
    box.appendChild(el("h2", null, "Failed files (" + rows.length + ")"));
    var ul = el("ul");
    rows.forEach(function (r) {
      var li = el("li");
      li.appendChild(el("span", "path", r.path));
      li.appendChild(el("span", null, ": "));
      li.appendChild(el("span", "error", r.error));
      ul.appendChild(li);
    });
    box.appendChild(ul);
    box.scrollIntoView();
  };

  function go(n) {
    if (!SAT.meta) return;
    n = Math.max(1, Math.min(SAT.meta.pages || 1, n));
    SAT.current = n;
    pageInfo.textContent = "page " + n + " of " + Math.max(1, SAT.meta.pages);
    pageInput.value = n;
    if (location.hash !== "#page=" + n) history.replaceState(null, "", "#page=" + n);
    if (SAT.pages[n]) render(n);
    else if (SAT.meta.pages) { grid.textContent = "loading..."; loadScript("data/page-" + pad(n) + ".js"); }
    else grid.textContent = "nothing stored yet";
  }

  function decodeMaps(c) {
    if (!c._maps) {
      var bin = atob(c.m), arr = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) arr[i] = bin.charCodeAt(i);
      c._maps = arr;
    }
    return c._maps;
  }

  function showWord(card, c, index, span) {
    var img = card.querySelector("img"), canvas = card.querySelector("canvas.overlay");
    var gh = c.g[0], gw = c.g[1], maps = decodeMaps(c), cell = gh * gw;
    var small = document.createElement("canvas");
    small.width = gw; small.height = gh;
    var sctx = small.getContext("2d"), data = sctx.createImageData(gw, gh);
    for (var i = 0; i < cell; i++) {
      var v = maps[index * cell + i] / 255;  // 1 where the model looked: let the photo through
      data.data[4 * i + 3] = Math.round(215 * (1 - v));
    }
    sctx.putImageData(data, 0, 0);
    var w = img.clientWidth, h = img.clientHeight;
    canvas.width = w; canvas.height = h;
    canvas.style.left = img.offsetLeft + "px"; canvas.style.top = img.offsetTop + "px";
    var ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.filter = "blur(" + Math.max(2, Math.round(Math.min(w / gw, h / gh) / 3)) + "px)";
    ctx.drawImage(small, 0, 0, w, h);
    canvas.style.display = "block";
    canvas.dataset.word = String(index);
    var stats = card.querySelector(".mapstats");  // per-map scaling hides the real numbers: print them
    if (stats && c.pk) {
      stats.textContent = c.wd[index] + ": peak " + c.pk[index].toFixed(3) + ", entropy " + c.en[index].toFixed(2) +
        " of uniform";
      stats.hidden = false;
    }
    card.querySelectorAll(".word.active").forEach(function (s) { s.classList.remove("active"); });
    span.classList.add("active");
  }

  function hideWord(card) {
    var canvas = card.querySelector("canvas.overlay");
    if (canvas.dataset.pinned) return;
    canvas.style.display = "none";
    var stats = card.querySelector(".mapstats");
    if (stats) stats.hidden = true;
    card.querySelectorAll(".word.active").forEach(function (s) { s.classList.remove("active"); });
  }

  function captionItem(card, c) {
    var li = el("li");
    if (c.m && c.wd.length) {
      c.wd.forEach(function (word, i) {
        var span = el("span", "word", word);
        span.dataset.index = String(i);
        span.addEventListener("mouseenter", function () {
          if (!card.querySelector("canvas.overlay").dataset.pinned) showWord(card, c, i, span);
        });
        span.addEventListener("mouseleave", function () { hideWord(card); });
        span.addEventListener("click", function () {
          var canvas = card.querySelector("canvas.overlay");
          canvas.dataset.pinned = "1";
          showWord(card, c, i, span);
        });
        li.appendChild(span);
        li.appendChild(document.createTextNode(" "));
      });
    } else {
      li.appendChild(el("span", null, c.x));
    }
    li.appendChild(el("span", "score", c.sc.toFixed(2)));
    if (!c.f) li.appendChild(el("span", "unfinished", " (unfinished)"));
    return li;
  }

  function card(rec) {
    var fig = el("figure", "card" + (rec.s === "failed" ? " failed" : ""));
    fig.style.margin = "0";
    fig.dataset.image = String(rec.i);
    if (rec.t) {
      var thumb = el("div", "thumb"), a = el("a"), img = el("img");
      img.loading = "lazy";
      img.alt = rec.c && rec.c.length ? rec.c[0].x : "";
      img.setAttribute("src", rec.t);
      a.setAttribute("href", rec.t);
      a.appendChild(img);
      thumb.appendChild(a);
      var canvas = el("canvas", "overlay");
      thumb.appendChild(canvas);
      thumb.addEventListener("dblclick", function () { delete canvas.dataset.pinned; hideWord(fig); });
      var stats = el("div", "mapstats");  // over the thumbnail's foot: showing it moves nothing
      stats.hidden = true;
      thumb.appendChild(stats);
      fig.appendChild(thumb);
    }
    var body = el("figcaption", "body");
    body.appendChild(el("div", "path", rec.p));
    if (rec.s === "failed") body.appendChild(el("div", "error", rec.e));
    if (rec.c && rec.c.length) {
      var ol = el("ol", "captions");
      rec.c.forEach(function (c) { ol.appendChild(captionItem(fig, c)); });
      body.appendChild(ol);
    }
    fig.appendChild(body);
    return fig;
  }

  function render(n) {
    grid.textContent = "";
    SAT.pages[n].forEach(function (rec) { grid.appendChild(card(rec)); });
    window.scrollTo(0, 0);
  }

  document.addEventListener("DOMContentLoaded", function () {
    grid = document.getElementById("grid");
    pageInfo = document.getElementById("page-info");
    pageInput = document.getElementById("page-input");
    document.getElementById("prev").onclick = function () { go(SAT.current - 1); };
    document.getElementById("next").onclick = function () { go(SAT.current + 1); };
    pageInput.onchange = function () { go(parseInt(pageInput.value, 10) || 1); };
    loadScript("data/manifest.js");
  });
})();
