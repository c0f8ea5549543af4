"""Drive a headless Chromium over the DevTools protocol, standard library only.

The browser is the distribution's package (``apt-get install chromium``),
started with ``--remote-debugging-pipe``: it reads protocol commands from its
file descriptor 3 and writes replies and events to descriptor 4, each message
one JSON object ended by a NUL byte.  No port, no websocket, no third-party
package.  One reader thread turns the byte stream into messages; everything
else waits on those with a deadline.

    with Chromium() as browser:
        page = browser.new_page()
        page.navigate("http://127.0.0.1:8000/")
        page.wait_for("document.title === 'ctinotify'")
        png = page.screenshot()

``Chromium()`` raises ``ChromiumMissing`` when no browser is installed; the
tests turn that into a skip, or into a failure under CI.  Closing ends the
browser and every process it started (it runs in a process group of its
own), and removes its throwaway profile.
"""

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

#: Executable names of Chromium in the distributions (Debian: chromium).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
#: How long a protocol command may take before the test fails.
COMMAND_TIMEOUT_S = 30.0
#: How long the browser gets to exit after Browser.close before it is killed.
CLOSE_TIMEOUT_S = 5.0
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--password-store=basic", "--use-mock-keychain", "--mute-audio", "--disable-breakpad",
    "--disable-crash-reporter",
    "--remote-debugging-pipe",
)
#: Runs in every page before its own scripts: records CSP violations, which
#: the page cannot hide, where the test can read them.
_WATCH_VIOLATIONS = """
window.__cdpViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cdpViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


class CdpError(Exception):
    """The browser answered a command with an error, or not in time."""


class ChromiumMissing(CdpError):
    """No Chromium executable was found."""


def find_chromium():
    """The Chromium to run: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    wanted = os.environ.get("CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else shutil.which(wanted)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium and its DevTools pipe."""

    def __init__(self, executable=None, width=1000, height=800, extra_flags=()):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise ChromiumMissing("no Chromium found (looked for %s); apt-get install chromium"
                                  % ", ".join(CHROMIUM_NAMES))
        self.profile = tempfile.mkdtemp(prefix="ctinotify-chromium-")
        self._next_id = 0
        self._lock = threading.Condition()
        self._replies = {}
        #: Every event received: (sessionId or None, method, params).
        self.events = []
        self._closed = False
        self._reader_error = None
        # The pipe ends the browser gets as descriptors 3 and 4, first moved
        # above 10 so that the redirections cannot clobber each other (bash:
        # dash takes one-digit descriptors only).  A shell, not preexec_fn:
        # that is unsafe with the reader threads of other browsers running.
        cmd_read, cmd_write = os.pipe()
        res_read, res_write = os.pipe()
        child_in = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(res_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_read)
        os.close(res_write)
        argv = ["bash", "-c", 'exec "$0" "$@" 3<&%d 4>&%d %d<&- %d>&-'
                % (child_in, child_out, child_in, child_out), self.executable]
        argv += list(CHROMIUM_FLAGS) + list(extra_flags)
        argv += ["--user-data-dir=" + self.profile, "--window-size=%d,%d" % (width, height),
                 "about:blank"]
        self._log = open(os.path.join(self.profile, "chromium.log"), "wb")
        try:
            self.process = subprocess.Popen(argv, pass_fds=(child_in, child_out),
                                            stdin=subprocess.DEVNULL, stdout=self._log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self._write_fd = cmd_write
        self._read_fd = res_read
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        try:
            self.version = self.send("Browser.getVersion")
        except Exception:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the pipe ------------------------------------------------------------

    def _read_loop(self):
        buffer = b""
        try:
            while True:
                data = os.read(self._read_fd, 1 << 16)
                if not data:
                    break
                buffer += data
                while b"\0" in buffer:
                    raw, _, buffer = buffer.partition(b"\0")
                    self._dispatch(json.loads(raw.decode("utf-8")))
        except (OSError, ValueError) as e:
            self._reader_error = e
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()

    def _dispatch(self, message):
        with self._lock:
            if "id" in message:
                self._replies[message["id"]] = message
            else:
                self.events.append((message.get("sessionId"), message.get("method"),
                                    message.get("params", {})))
            self._lock.notify_all()
        if message.get("method") == "Page.javascriptDialogOpening":
            # A dialog would block the page forever: record it, dismiss it.
            threading.Thread(target=self._dismiss_dialog, args=(message.get("sessionId"),),
                             daemon=True).start()

    def _dismiss_dialog(self, session):
        try:
            self.send("Page.handleJavaScriptDialog", {"accept": False}, session=session)
        except CdpError:
            pass

    def send(self, method, params=None, session=None, timeout=COMMAND_TIMEOUT_S):
        """Run one protocol command; its result, or CdpError."""
        with self._lock:
            if self._closed:
                raise CdpError("the browser is gone (%s)" % method)
            self._next_id += 1
            ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode("utf-8") + b"\0"
        try:
            while data:
                data = data[os.write(self._write_fd, data):]
        except OSError as e:
            raise CdpError("cannot send %s: %s" % (method, e))
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CdpError("no reply to %s within %g s%s" % (
                        method, timeout, " (the browser exited)" if self._closed else ""))
                self._lock.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise CdpError("%s: %s" % (method, reply["error"].get("message", reply["error"])))
        return reply.get("result", {})

    def wait_event(self, method, session=None, predicate=None, timeout=COMMAND_TIMEOUT_S,
                   start=0):
        """The first event ``method`` (of ``session``) from index ``start`` on
        that ``predicate(params)`` accepts; CdpError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            index = start
            while True:
                while index < len(self.events):
                    sess, name, params = self.events[index]
                    index += 1
                    if name == method and (session is None or sess == session) and \
                            (predicate is None or predicate(params)):
                        return params
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CdpError("no %s event within %g s" % (method, timeout))
                self._lock.wait(left)

    # -- the browser -------------------------------------------------------------

    def new_page(self, width=None, height=None, mobile=False, isolated=True):
        """A new tab, attached, with the domains the tests watch enabled.
        ``isolated``: in a browser context of its own (an incognito-like
        profile): no cookies, storage or permissions shared with other tabs."""
        params = {"url": "about:blank"}
        context = None
        if isolated:
            context = self.send("Target.createBrowserContext")["browserContextId"]
            params["browserContextId"] = context
        target = self.send("Target.createTarget", params)["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session, context)
        for domain in ("Page", "Runtime", "Log"):
            page.send(domain + ".enable")
        page.send("Page.addScriptToEvaluateOnNewDocument", {"source": _WATCH_VIOLATIONS})
        if width and height:
            page.set_viewport(width, height, mobile)
        return page

    def grant_permissions(self, origin, permissions=("notifications",), context=None):
        """Grant ``origin`` the permissions (as a user clicking Allow would),
        in a page's browser context (``page.context``) or the default one."""
        params = {"origin": origin, "permissions": list(permissions)}
        if context is not None:
            params["browserContextId"] = context
        self.send("Browser.grantPermissions", params)

    def close(self):
        """End the browser and everything it started; remove its profile."""
        if self.process.poll() is None and not self._closed:
            try:
                self.send("Browser.close", timeout=CLOSE_TIMEOUT_S)
            except CdpError:
                pass
        try:
            self.process.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        # Its helpers (zygote, renderers) share its process group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._kill_leftovers()
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._reader.join(5)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _kill_leftovers(self):
        """Chromium's crash handler starts a session of its own, outside the
        process group: end whatever still names this browser's profile."""
        needle = self.profile.encode()
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if needle in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def log_text(self):
        """What the browser wrote on stdout and stderr so far (for failures)."""
        try:
            with open(os.path.join(self.profile, "chromium.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Page:
    """One tab: navigate, evaluate, wait for a condition, take screenshots.

    ``console_errors()``, ``exceptions()``, ``dialogs()`` and
    ``csp_violations()`` say what went wrong in it so far.
    """

    def __init__(self, browser, target_id, session_id, context=None):
        self.browser = browser
        self.target_id = target_id
        self.session = session_id
        #: Its browser context (None: the default one).
        self.context = context

    def send(self, method, params=None, timeout=COMMAND_TIMEOUT_S):
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def _events(self, method):
        return [params for sess, name, params in list(self.browser.events)
                if sess == self.session and name == method]

    def navigate(self, url, timeout=COMMAND_TIMEOUT_S):
        """Load ``url`` and wait for its load event."""
        start = len(self.browser.events)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError("navigating to %s: %s" % (url, result["errorText"]))
        self.browser.wait_event("Page.loadEventFired", self.session, timeout=timeout, start=start)

    def evaluate(self, expression, await_promise=False, timeout=COMMAND_TIMEOUT_S):
        """The value of a JavaScript expression (JSON-able), or CdpError if it threw."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError("%s threw: %s" % (expression[:80], text))
        return result.get("result", {}).get("value")

    def wait_for(self, expression, timeout=10.0, interval=0.05):
        """Evaluate ``expression`` until it is truthy; its value, or CdpError
        (with its last value) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        value = None
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise CdpError("waited %g s for %s; it is %r" % (timeout, expression[:120], value))
            time.sleep(interval)

    def add_init_script(self, source):
        """Run ``source`` in every document this tab loads, before its own scripts."""
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def set_viewport(self, width, height, mobile=False):
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def screenshot(self, path=None):
        """A PNG of the viewport; written to ``path`` if given."""
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        if path:
            with open(path, "wb") as f:
                f.write(data)
        return data

    # -- input, as a person's mouse and keyboard give it --------------------------

    def center(self, selector):
        """The middle of the first element ``selector`` matches, scrolled
        into view, in CSS pixels of the viewport; CdpError if there is none."""
        point = self.evaluate(
            "(function () { var e = document.querySelector(%s); if (!e) { return null; }"
            " e.scrollIntoView({block: 'center', inline: 'center'});"
            " var r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()" % json.dumps(selector))
        if not point:
            raise CdpError("nothing on the page matches %s" % selector)
        return point

    def _mouse(self, kind, x, y, buttons=0, **extra):
        self.send("Input.dispatchMouseEvent", dict({"type": kind, "x": x, "y": y,
                                                    "buttons": buttons}, **extra))

    def click(self, selector):
        """A left click in the middle of the element, through the browser's
        input pipeline (hit testing, focus, pointer and click events)."""
        x, y = self.center(selector)
        self._mouse("mouseMoved", x, y)
        self._mouse("mousePressed", x, y, 1, button="left", clickCount=1)
        self._mouse("mouseReleased", x, y, 0, button="left", clickCount=1)

    #: Keys press() knows: (key, code, Windows key code, text).
    KEYS = {"Enter": ("Enter", "Enter", 13, "\r"), "Tab": ("Tab", "Tab", 9, ""),
            " ": (" ", "Space", 32, " ")}

    def press(self, key):
        """One key down and up on whatever has the focus."""
        name, code, vk, text = self.KEYS[key]
        down = {"type": "keyDown" if text else "rawKeyDown", "key": name, "code": code,
                "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}
        if text:
            down["text"] = text
        self.send("Input.dispatchKeyEvent", down)
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": name, "code": code,
                                             "windowsVirtualKeyCode": vk,
                                             "nativeVirtualKeyCode": vk})

    def drag(self, source, target, steps=5):
        """Drag the element ``source`` with the mouse and drop it on
        ``target`` (HTML drag and drop).  A headless browser has no desktop
        to carry a drag: the browser hands it over (Input.setInterceptDrags),
        then the drop is given back with the data the page put on it, as
        the desktop would."""
        x0, y0 = self.center(source)
        start = len(self.browser.events)
        self.send("Input.setInterceptDrags", {"enabled": True})
        try:
            self._mouse("mouseMoved", x0, y0)
            self._mouse("mousePressed", x0, y0, 1, button="left", clickCount=1)
            x1, y1 = self.center(target)
            for step in range(1, steps + 1):
                self._mouse("mouseMoved", x0 + (x1 - x0) * step / steps,
                            y0 + (y1 - y0) * step / steps, 1, button="left")
            data = self.browser.wait_event("Input.dragIntercepted", self.session,
                                           start=start)["data"]
            for kind in ("dragEnter", "dragOver", "drop"):
                self.send("Input.dispatchDragEvent", {"type": kind, "x": x1, "y": y1,
                                                      "data": data})
            self._mouse("mouseReleased", x1, y1, 0, button="left", clickCount=1)
        finally:
            self.send("Input.setInterceptDrags", {"enabled": False})

    def console_errors(self):
        """Console errors, uncaught exceptions and the browser's own error
        log entries (a failed load, a CSP report) as text."""
        found = []
        for params in self._events("Runtime.consoleAPICalled"):
            if params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description", "")))
                                      for a in params.get("args", [])))
        for params in self._events("Runtime.exceptionThrown"):
            details = params.get("exceptionDetails", {})
            found.append(details.get("exception", {}).get("description") or details.get("text", ""))
        for params in self._events("Log.entryAdded"):
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                found.append("%s: %s" % (entry.get("source"), entry.get("text")))
        return found

    def dialogs(self):
        """The alert/confirm/prompt dialogs the page opened (each dismissed)."""
        return [p.get("message", "") for p in self._events("Page.javascriptDialogOpening")]

    def csp_violations(self):
        """Content-Security-Policy violations the page reported."""
        try:
            return list(self.evaluate("window.__cdpViolations || []"))
        except CdpError:
            return []

    def grant(self, origin, permissions=("notifications",)):
        self.browser.grant_permissions(origin, permissions, self.context)

    def close(self):
        try:
            self.send("Target.closeTarget", {"targetId": self.target_id},
                      timeout=CLOSE_TIMEOUT_S)
            if self.context is not None:
                self.browser.send("Target.disposeBrowserContext",
                                  {"browserContextId": self.context}, timeout=CLOSE_TIMEOUT_S)
        except CdpError:
            pass
