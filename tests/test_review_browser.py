"""The review page end to end: the real `elemental review` process and headless Chromium, a person's twenty
decisions by keyboard across a killed server, checked in reviews.jsonl, train.json / val.json and metadata.json.

`review_in_browser` is the reusable part: it returns the reviewed copy of the demo dataset and the decisions
made, for tests that go on from a reviewed dataset (evaluate's teacher-vs-person check).

Needs Debian's chromium and chromedriver (nothing is downloaded). Without them the test skips, unless
ELEMENTAL_REQUIRE_BROWSER is set (CI), where it fails. ELEMENTAL_SCREENSHOTS=1 also writes
docs/review-desktop.png (1280x800) and docs/review-phone.png (390x844).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_process import elemental

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[1] / "docs"
WAIT_S = 20


@dataclass(frozen=True)
class Made:
    """One standing decision the test made in the page (undone ones are not listed)."""

    digest: str
    image_id: str
    split: str
    action: str  # accept | relabel | drop
    teacher: str
    new: str | None  # the person's label; None for a drop


@dataclass
class ReviewedCopy:
    dataset_dir: Path
    decisions: list[Made]  # in the order they were made
    log_actions: list[tuple[str, str, str | None]]  # (digest, action, new) of every line the log must hold


@pytest.fixture(scope="session")
def browser() -> tuple[str, str]:
    """Debian's chromium and chromedriver; skip (or fail, under ELEMENTAL_REQUIRE_BROWSER) without them. Session
    scope, and first in a test's arguments, so a missing browser skips before the demo fixture is built."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    why = "chromium, chromedriver and selenium are needed for the review page test"
    if os.environ.get("ELEMENTAL_REQUIRE_BROWSER"):
        pytest.fail(f"ELEMENTAL_REQUIRE_BROWSER is set but {why} (found chromium={chromium}, chromedriver={driver})")
    pytest.skip(why)


@contextmanager
def chrome(chromium: str, chromedriver: str) -> Iterator:
    """Headless Chromium at 1280x800 through the system's chromedriver (the Service path keeps Selenium Manager,
    which would download a driver, out of it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def review_server(dataset_dir: Path, run_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`elemental review DATASET --run RUN --no-browser --port 0`, and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "elemental", "review", str(dataset_dir), "--run", str(run_dir),
                             "--no-browser", "--port", "0"], cwd=dataset_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("review: http://"), f"no URL line: {line!r}; stderr: {_stderr(proc)}"
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()


def _stderr(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    return proc.stderr.read()[-3000:]


def queue_order(url: str) -> list[dict]:
    """The server's queue (what the page walks through), asked with the token like the page does."""
    base, token = url.split("?token=")
    request = urllib.request.Request(base + "api/state", headers={"X-Review-Token": token})
    with urllib.request.urlopen(request, timeout=30) as res:
        return json.load(res)["items"]


class Page:
    """The review page as a person at the keyboard sees it."""

    def __init__(self, driver, labels: list[str]) -> None:
        self.driver = driver
        self.labels = labels

    def open(self, url: str) -> None:
        self.driver.get(url)
        self._wait(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")

    def shown(self) -> str:
        return self.driver.find_element("id", "photo-box").get_attribute("data-digest")

    def teacher(self) -> str:
        return self.driver.find_element("id", "teacher").text

    def press(self, key: str, expect: str) -> None:
        """Press one key and wait for the server's answer to show (status starting with `expect`)."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()

        def answered(d) -> bool:
            status = d.find_element("id", "status")
            if "error" in status.get_attribute("class"):
                raise AssertionError(f"the page shows an error: {status.text}")
            return d.find_element("tag name", "body").get_attribute("data-busy") == "false" and \
                status.text.startswith(expect)

        self._wait(answered)

    def filter(self, select_id: str, value: str) -> None:
        from selenium.webdriver.support.select import Select

        Select(self.driver.find_element("id", select_id)).select_by_value(value)
        self.driver.execute_script("document.activeElement.blur()")  # keys go to the page, not the select

    def toggle(self, checkbox_id: str) -> None:
        self.driver.find_element("id", checkbox_id).click()
        self.driver.execute_script("document.activeElement.blur()")

    def move(self, key: str, to: str) -> None:
        """An arrow key (no request): wait for the page to show photo `to`."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()
        self._wait(lambda _: self.shown() == to)

    def screenshot(self, path: Path, width: int, height: int, mobile: bool) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def _wait(self, condition) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, WAIT_S).until(condition)


class Reviewer:
    """Makes decisions in the page and remembers what the log must hold."""

    def __init__(self, page: Page, items: dict[str, dict]) -> None:
        self.page, self.items = page, items
        self.made: list[Made] = []
        self.log: list[tuple[str, str, str | None]] = []

    def decide(self, how: str) -> None:
        """how: enter | space (accept), own (the teacher's number key: accept), other (relabel by number), x."""
        item = self.items[self.page.shown()]
        assert self.page.teacher() == item["teacher"]
        labels = self.page.labels
        teacher_key = labels.index(item["teacher"]) + 1
        other = labels[teacher_key % len(labels)]
        key, action, new = {
            "enter": ("\ue007", "accept", item["teacher"]), "space": (" ", "accept", item["teacher"]),
            "own": (str(teacher_key), "accept", item["teacher"]), "x": ("x", "drop", None),
            "other": (str(labels.index(other) + 1), "relabel", other),
        }[how]
        self.page.press(key, f"saved: {item['image_id']}")
        self.made.append(Made(item["digest"], item["image_id"], item["split"], action, item["teacher"], new))
        self.log.append((item["digest"], action, new))

    def undo(self) -> None:
        last = self.made.pop()
        self.page.press("u", f"undone: {last.image_id}")
        assert self.page.shown() == last.digest  # the page goes back to the photo
        self.log.append((last.digest, "undo", None))


def check_filters(page: Page, queue: list[dict], made: list[Made]) -> None:
    """"changed" shows the relabelled and dropped photos in queue order, walked with the arrow keys; a label
    filter shows the first undecided photo the teacher gave that label."""
    page.filter("f-split", "")
    page.toggle("f-changed")
    changed = {m.digest for m in made if m.action != "accept"}
    expected = [i["digest"] for i in queue if i["digest"] in changed]
    assert page.shown() == expected[0]
    page.move("\ue014", expected[1])  # →
    page.move("\ue014", expected[2])
    page.move("\ue012", expected[1])  # ←
    page.toggle("f-changed")
    label = page.labels[2]
    page.filter("f-label", label)
    decided = {m.digest for m in made}
    assert page.shown() == next(i["digest"] for i in queue if i["teacher"] == label and i["digest"] not in decided)
    page.filter("f-label", "")


def review_in_browser(browser: tuple[str, str], demo_dir: Path, workdir: Path, screenshots: bool = False
                      ) -> ReviewedCopy:
    """Copy the demo's dataset into `workdir` and review 20 photos by keyboard in headless Chromium: 10 (with one
    undo), the server SIGKILLed and started again, the page reloaded at the first undecided photo, 5 more, then
    5 train photos through the split filter. Returns the copy and what was decided."""
    chromium, chromedriver = browser
    copy = Path(shutil.copytree(demo_dir / "dataset", workdir / "dataset"))
    run_dir = demo_dir / "run"
    with chrome(chromium, chromedriver) as driver:
        with review_server(copy, run_dir) as (proc, url):
            queue = queue_order(url)
            labels = json.loads((copy / "metadata.json").read_text())["labels"]
            page = Page(driver, labels)
            reviewer = Reviewer(page, {i["digest"]: i for i in queue})
            page.open(url)
            for n, how in enumerate(["enter", "other", "space", "x", "own", "other"]):
                assert page.shown() == queue[n]["digest"], f"photo {n + 1} is not the queue's"
                reviewer.decide(how)
            reviewer.undo()
            for how in ["other", "enter", "other", "space", "enter"]:
                assert page.shown() == queue[len(reviewer.made)]["digest"]
                reviewer.decide(how)
            assert len(reviewer.made) == 10
            proc.send_signal(signal.SIGKILL)
        with review_server(copy, run_dir) as (_, url):
            page.open(url)  # a new token: the person opens the new URL
            assert page.shown() == queue[10]["digest"], "the page must continue at the first undecided photo"
            for how in ["other", "enter", "x", "space", "other"]:
                reviewer.decide(how)
                if screenshots and len(reviewer.made) == 11:  # mid-review: counts, a saved line, the next photo
                    page.screenshot(DOCS / "review-desktop.png", 1280, 800, mobile=False)
                    page.screenshot(DOCS / "review-phone.png", 390, 844, mobile=True)
            page.filter("f-split", "train")
            train = [i for i in queue if i["split"] == "train"]
            for n, how in enumerate(["enter", "other", "space", "x", "other"]):
                assert page.shown() == train[n]["digest"], f"train photo {n + 1} is not the queue's"
                reviewer.decide(how)
            progress = driver.find_element("id", "progress").text
            assert "20 reviewed" in progress, progress
            check_filters(page, queue, reviewer.made)
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e["source"] == "javascript"]
            assert not errors, errors
    return ReviewedCopy(copy, reviewer.made, reviewer.log)


def test_twenty_photos_by_keyboard_across_a_killed_server(browser, demo_dir, tmp_path):
    screenshots = os.environ.get("ELEMENTAL_SCREENSHOTS") == "1"
    reviewed = review_in_browser(browser, demo_dir, tmp_path, screenshots)
    ds, made = reviewed.dataset_dir, reviewed.decisions
    assert len(made) == 20 and len({m.digest for m in made}) == 20
    assert sum(m.split == "val" for m in made) == 15 and sum(m.split == "train" for m in made) == 5
    kinds = [m.action for m in made]
    assert kinds.count("drop") == 3 and kinds.count("relabel") == 7 and kinds.count("accept") == 10

    lines = [json.loads(line) for line in (ds / "reviews.jsonl").read_text().splitlines()]
    assert [(d["digest"], d["action"], d["new"]) for d in lines] == reviewed.log_actions
    teacher = {m.digest: m.teacher for m in made}
    assert all(d["old"] == teacher[d["digest"]] for d in lines)  # `old` is always the teacher's label

    splits = {s: {r["image_id"]: r for r in json.loads((ds / f"{s}.json").read_text())} for s in ("train", "val")}
    for m in made:
        records = splits[m.split]
        if m.action == "drop":
            assert m.image_id not in records and m.image_id not in splits["train"] | splits["val"]
            continue
        r = records[m.image_id]  # in its own split: a review never moves a photo
        assert (r["element"], r["teacher_element"], r["review"]) == (m.new, m.teacher, m.action)
    assert len(splits["val"]) == 30 - 2 and len(splits["train"]) == 270 - 1

    block = json.loads((ds / "metadata.json").read_text())["reviews"]
    assert {k: block[k] for k in ("reviewed", "accepted", "changed", "dropped")} == {
        "reviewed": 20, "accepted": 10, "changed": 7, "dropped": 3}
    assert block["by_split"]["val"]["reviewed"] == 15 and block["by_split"]["train"]["dropped"] == 1
    assert block["decisions"] == len(reviewed.log_actions)

    # evaluate measures the teacher against the person on these decisions (the demo's GGUF files, what ships).
    out = tmp_path / "res_gguf.json"
    res = elemental("evaluate", "--model_path", str(demo_dir / "gguf"), "--dataset_dir", str(ds),
                    "--output_path", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    teacher_block, student = results["review"]["teacher"], results["review"]["student"]
    assert teacher_block["reviewed"] == 20 and teacher_block["agreement"] == pytest.approx(10 / 20)
    for label, c in teacher_block["per_class"].items():
        mine = [m for m in made if m.teacher == label]
        assert c["reviewed"] == len(mine) and c["agreed"] == sum(m.action == "accept" for m in mine)
    kept_val = [m for m in made if m.split == "val" and m.action != "drop"]
    id_of = {r["image_path"]: r["image_id"] for r in json.loads((ds / "teacher_labels.json").read_text())["val"]}
    predicted = {id_of[p["image_path"]]: p["predicted"] for p in results["predictions"]}
    assert results["n"] == 28 and student["reviewed"] == len(kept_val) == 13 and student["dropped"] == 2
    assert student["accuracy_vs_person"] == pytest.approx(
        sum(predicted[m.image_id] == m.new for m in kept_val) / len(kept_val))
    assert student["teacher_accuracy_vs_person"] == pytest.approx(
        sum(m.action == "accept" for m in kept_val) / len(kept_val))
    assert "teacher vs person: kept 0.500 of 20 reviewed photos" in res.stdout
