"""The playground in real headless Chromium against a real server: generate (live previews, the grid with seeds,
the download), cancel, invert (drop an image), interpolate (an animation), a conditional model's classes, errors in
words, the API key, the keyboard and a 360 px wide screen; no console errors and no request leaving the server."""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.helpers import npy
from tests.playground.browser import console_errors, download, requests_sent, screenshot, wait_until

SHOTS = "playground-screenshots"


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def open_page(driver: Any, server: str) -> None:
    driver.get(f"{server}/")
    wait_until(driver, lambda d: by_id(d, "server-status").get_attribute("data-state") == "ready", "the models")
    console_errors(driver)  # each flow starts with empty logs
    requests_sent(driver)


def fill(driver: Any, element_id: str, value: object) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(str(value))


def choose(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_visible_text(text)


def status(driver: Any, panel: str) -> Any:
    return driver.find_element("css selector", f"#{panel} .status")


def run(driver: Any, panel: str, states: tuple[str, ...] = ("done", "error", "cancelled")) -> str:
    """Press the panel's submit button and wait for the run to end; its status text."""
    driver.find_element("css selector", f"#{panel} button[type=submit]").click()
    return finish(driver, panel, states)


def finish(driver: Any, panel: str, states: tuple[str, ...] = ("done", "error", "cancelled")) -> str:
    wait_until(driver, lambda d: status(d, panel).get_attribute("data-state") in states, f"{panel} to end")
    return str(status(driver, panel).text)


def sources(driver: Any, selector: str) -> list[str]:
    return [str(im.get_attribute("src")) for im in driver.find_elements("css selector", selector)]


def data_urls(images: list[str]) -> list[str]:
    return [f"data:image/png;base64,{b64}" for b64 in images]


def assert_local(server: str, requests: list[dict[str, Any]]) -> None:
    """Nothing the page asked for left the server (data: and blob: URLs stay in the page)."""
    outside = [r["url"] for r in requests if not r["url"].startswith((server + "/", "data:", "blob:"))]
    assert requests and not outside, outside


def metric(http: httpx.Client, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def api(server: str) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c  # type: ignore[misc]


@pytest.fixture
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / SHOTS


def test_generate_streams_previews_and_shows_the_grid_with_seeds(browser: Any, server: str, api: httpx.Client,
                                                                  tmp_path: Path, shots: Path) -> None:
    open_page(browser, server)
    fill(browser, "api-key", "key-19")
    for field, value in {"gen-steps": 6, "gen-eta": 0.5, "gen-seed": 7, "gen-n": 4, "gen-preview-every": 2}.items():
        fill(browser, field, value)
    assert run(browser, "generate") == "Done: 4 images, seeds 7 to 10."

    body = {"model": "tiny", "steps": 6, "eta": 0.5, "n": 4, "preview_every": 2, "seed": 7}
    answer = api.post("/generate", json=body).json()
    assert sources(browser, "#gen-results img") == data_urls(answer["images"])
    captions = [f.text for f in browser.find_elements("css selector", "#gen-results figcaption")]
    assert captions == ["seed 7", "seed 8", "seed 9", "seed 10"]
    preview = by_id(browser, "gen-preview")
    assert preview.get_attribute("data-previews") == "3"  # steps 2, 4 and 6
    assert str(preview.get_attribute("src")).startswith("data:image/png;base64,")

    link = by_id(browser, "gen-download")
    assert link.get_attribute("download") == "ddim-tiny-seed-7-n4.png"
    assert str(link.get_attribute("href")).startswith("blob:")
    downloaded = Image.open(download(browser, link, tmp_path))
    grid = Image.open(io.BytesIO(api.post("/generate", json=body, headers={"accept": "image/png"}).content))
    assert downloaded.format == "PNG" and downloaded.size == grid.size
    assert np.array_equal(np.asarray(downloaded.convert("L")), np.asarray(grid.convert("L")))

    screenshot(browser, shots / "generate.png")
    sent = requests_sent(browser)
    assert_local(server, sent)
    posts = [r for r in sent if r["method"] == "POST" and r["url"] == f"{server}/generate"]
    assert len(posts) == 1 and posts[0]["headers"]["Authorization"] == "Bearer key-19"
    assert posts[0]["headers"]["Accept"] == "text/event-stream"
    assert console_errors(browser) == []


def test_a_conditional_model_offers_its_classes_and_guidance(browser: Any, server: str, api: httpx.Client) -> None:
    open_page(browser, server)
    assert not by_id(browser, "conditioning").is_displayed()
    choose(browser, "model", "tiny-cond (vp, 8×8, grey, conditional)")
    assert by_id(browser, "conditioning").is_displayed()
    classes = [o.text for o in by_id(browser, "class-label").find_elements("tag name", "option")]
    assert classes == ["none (unconditional)", "cat", "dog", "ankle boot"]
    model = next(m for m in api.get("/models").json()["models"] if m["name"] == "tiny-cond")
    schedules = [o.text for o in by_id(browser, "schedule").find_elements("tag name", "option")]
    assert schedules == ["the model's default", *model["schedules"]]
    choose(browser, "class-label", "dog")
    choose(browser, "schedule", "trailing")
    fill(browser, "guidance", 2.5)
    for field, value in {"gen-steps": 4, "gen-seed": 3, "gen-n": 2, "gen-preview-every": 0}.items():
        fill(browser, field, value)
    assert run(browser, "generate").startswith("Done: 2 images")
    body = {"model": "tiny-cond", "class_label": 1, "guidance_scale": 2.5, "schedule": "trailing", "steps": 4,
            "seed": 3, "n": 2}
    assert sources(browser, "#gen-results img") == data_urls(api.post("/generate", json=body).json()["images"])
    choose(browser, "model", "tiny (vp, 8×8, grey)")
    assert not by_id(browser, "conditioning").is_displayed()
    assert console_errors(browser) == []


def test_a_failed_model_is_shown_not_offered(browser: Any, server: str) -> None:
    open_page(browser, server)
    assert by_id(browser, "server-status").text == "Ready: 2 models; 1 failed to load."
    offered = [o.get_attribute("value") for o in by_id(browser, "model").find_elements("tag name", "option")]
    assert offered == ["tiny", "tiny-cond"]
    failed = by_id(browser, "failed-models").find_elements("tag name", "li")
    assert [f.get_attribute("data-model") for f in failed] == ["unsupported"]
    assert "KandinskyV22Pipeline" in failed[0].text and failed[0].is_displayed()


def test_the_sampler_select_runs_a_multistep_solver(browser: Any, server: str, api: httpx.Client) -> None:
    open_page(browser, server)
    model = next(m for m in api.get("/models").json()["models"] if m["name"] == "tiny")
    assert [o.text for o in by_id(browser, "sampler").find_elements("tag name", "option")] == model["samplers"]
    choose(browser, "sampler", "dpmsolver++")
    schedules = [o.text for o in by_id(browser, "schedule").find_elements("tag name", "option")]
    assert schedules == ["the model's default", *model["solver_schedules"]]
    choose(browser, "schedule", "karras")
    for field, value in {"gen-steps": 5, "gen-seed": 2, "gen-n": 2, "gen-preview-every": 0}.items():
        fill(browser, field, value)
    assert run(browser, "generate").startswith("Done: 2 images")
    body = {"model": "tiny", "sampler": "dpmsolver++", "schedule": "karras", "steps": 5, "seed": 2, "n": 2}
    assert sources(browser, "#gen-results img") == data_urls(api.post("/generate", json=body).json()["images"])
    choose(browser, "sampler", "ddim")
    assert console_errors(browser) == []


def test_cancel_stops_the_work_on_the_server(browser: Any, server: str, api: httpx.Client, shots: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    cancelled = 'ddim_requests_cancelled_total{model="tiny"}'
    before = metric(api, cancelled)
    open_page(browser, server)
    for field, value in {"gen-steps": 1000, "gen-n": 16, "gen-preview-every": 100}.items():
        fill(browser, field, value)
    for cancel in ("button", "Escape"):
        if cancel == "button":
            browser.find_element("css selector", "#generate button[type=submit]").click()
        else:
            by_id(browser, "gen-steps").send_keys(Keys.ENTER)  # submit from the keyboard
        wait_until(browser, lambda d: status(d, "generate").text.startswith("Step "), "the first step")
        if cancel == "button":
            screenshot(browser, shots / "generate-running.png")
            browser.find_element("css selector", "#generate button.cancel").click()
        else:
            by_id(browser, "gen-steps").send_keys(Keys.ESCAPE)
        assert finish(browser, "generate") == "Cancelled."

    def idle() -> bool:
        tiny = next(m for m in api.get("/models").json()["models"] if m["name"] == "tiny")
        return tiny["active"] == 0 and tiny["waiting"] == 0

    for _ in range(600):  # the server notices each closed stream and cancels its work (bounded: 600 x 0.05 s)
        if metric(api, cancelled) >= before + 2 and idle():
            break
        time.sleep(0.05)
    assert metric(api, cancelled) == before + 2 and idle()  # both runs cancelled, their samples gone
    assert console_errors(browser) == []


def test_invert_a_dropped_image(browser: Any, server: str, api: httpx.Client, tmp_path: Path, shots: Path) -> None:
    image = api.post("/generate", json={"steps": 4, "seed": 5}, headers={"accept": "image/png"}).content
    open_page(browser, server)
    browser.find_element("id", "tab-invert").click()
    drop = """const [zone, b64, name] = arguments;
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const files = new DataTransfer();
      files.items.add(new File([bytes], name, {type: "image/png"}));
      zone.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));"""
    browser.execute_script(drop, by_id(browser, "invert-drop"), base64.b64encode(image).decode(), "dropped.png")
    assert browser.execute_script("return document.getElementById('invert-file').files[0].name") == "dropped.png"
    assert str(by_id(browser, "inv-original").get_attribute("src")).startswith("blob:")  # shown at once
    fill(browser, "inv-steps", 6)
    assert run(browser, "invert").startswith("Done: inverted with S = 6")

    answer = api.post("/invert", json={"images": [base64.b64encode(image).decode()], "steps": 6,
                                       "return_reconstruction": True}).json()
    assert sources(browser, "#inv-reconstruction") == data_urls(answer["reconstruction"])
    shown_mse = float(by_id(browser, "inv-mse").text.split()[0])
    assert shown_mse == pytest.approx(answer["reconstruction_mse"][0], rel=1e-3)
    x_T = npy(answer["x_T"]).astype(np.float64)
    xt = re.fullmatch(r"shape (\S+), mean (\S+), std (\S+)", by_id(browser, "inv-xt").text)
    assert xt and xt.group(1) == "1×1×8×8"
    assert float(xt.group(2)) == pytest.approx(x_T.mean(), rel=1e-3)
    assert float(xt.group(3)) == pytest.approx(x_T.std(), rel=1e-3)
    screenshot(browser, shots / "invert.png")
    assert_local(server, requests_sent(browser))
    assert console_errors(browser) == []

    (tmp_path / "notes.png").write_text("not an image")  # the server's error, in words
    by_id(browser, "invert-file").send_keys(str(tmp_path / "notes.png"))
    said = run(browser, "invert")
    assert said.startswith("Please check the form: Image: images.0 is not an image in a format this server reads"), said
    assert "422" not in said
    assert [e["source"] for e in console_errors(browser)] == ["network"]  # Chromium logs the 422 itself


def test_interpolate_animates_the_frames(browser: Any, server: str, api: httpx.Client, tmp_path: Path,
                                         shots: Path) -> None:
    open_page(browser, server)
    browser.find_element("id", "tab-interpolate").click()
    for field, value in {"start-seed": 1, "end-seed": 2, "int-frames": 5, "int-steps": 3}.items():
        fill(browser, field, value)
    assert run(browser, "interpolate") == "Done: 5 frames (slerp), S = 3."
    body = {"start": {"seed": 1}, "end": {"seed": 2}, "frames": 5, "steps": 3}
    frames = data_urls(api.post("/interpolate", json=body).json()["images"])
    assert sources(browser, "#int-frames-strip img") == frames
    seen: set[str] = set()

    def animated(d: Any) -> bool:
        seen.add(str(by_id(d, "int-animation").get_attribute("src")))
        return len(seen) >= 3
    wait_until(browser, animated, "the animation to show three frames")
    assert seen <= set(frames)
    assert re.fullmatch(r"frame [1-5] of 5", by_id(browser, "int-frame-label").text)
    screenshot(browser, shots / "interpolate.png")
    by_id(browser, "int-play").click()
    assert by_id(browser, "int-play").text == "Play"

    start = api.post("/generate", json={"steps": 4, "seed": 9}, headers={"accept": "image/png"}).content
    (tmp_path / "start.png").write_bytes(start)
    by_id(browser, "start-file").send_keys(str(tmp_path / "start.png"))  # picks "image" for the start
    choose(browser, "int-method", "lerp")
    assert run(browser, "interpolate") == "Done: 5 frames (lerp), S = 3."
    body = {**body, "start": {"image": base64.b64encode(start).decode()}, "method": "lerp"}
    assert sources(browser, "#int-frames-strip img") == data_urls(api.post("/interpolate", json=body).json()["images"])
    assert_local(server, requests_sent(browser))
    assert console_errors(browser) == []


def test_errors_are_shown_in_words(browser: Any, server: str) -> None:
    open_page(browser, server)
    fill(browser, "gen-seed", 2**63)
    said = run(browser, "generate")
    assert status(browser, "generate").get_attribute("data-state") == "error"
    assert said.startswith("Please check the form: Seed: Input should be less than or equal to"), said
    assert [e["source"] for e in console_errors(browser)] == ["network"]
    browser.find_element("id", "tab-interpolate").click()
    browser.find_element("css selector", "input[name=end-kind][value=image]").click()
    assert run(browser, "interpolate") == "Choose the end image, or pick a seed for the end."
    assert console_errors(browser) == []


def test_the_keyboard_reaches_everything_and_the_page_fits_360_px(browser: Any, server: str, shots: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 360, "height": 760, "deviceScaleFactor": 1, "mobile": True})
    try:
        open_page(browser, server)
        reached = set()
        body = browser.find_element("tag name", "body")
        body.click()
        for _ in range(40):  # Tab through the page
            browser.switch_to.active_element.send_keys(Keys.TAB)
            active = browser.switch_to.active_element
            reached.add(active.get_attribute("id") or active.text)
        assert {"api-key", "model", "schedule", "tab-generate", "gen-steps", "gen-eta", "gen-seed", "gen-n",
                "gen-preview-every", "Generate"} <= reached
        tab = by_id(browser, "tab-generate")
        tab.send_keys(Keys.ARROW_RIGHT)
        assert browser.switch_to.active_element.get_attribute("id") == "tab-invert"
        for panel, key in (("invert", None), ("edit", Keys.END), ("interpolate", Keys.ARROW_LEFT),
                           ("generate", Keys.HOME)):
            if key:
                browser.switch_to.active_element.send_keys(key)
            assert by_id(browser, panel).is_displayed()
            overflow = browser.execute_script("""
              const wide = document.documentElement.scrollWidth;
              const out = [...document.querySelectorAll("input, select, button, label, img")]
                .filter((e) => e.offsetParent !== null && e.getBoundingClientRect().right > window.innerWidth + 0.5)
                .map((e) => e.id || e.textContent.trim());
              return [wide, window.innerWidth, out];""")
            assert overflow[0] <= overflow[1] == 360 and overflow[2] == [], overflow
        fill(browser, "gen-steps", 5)
        by_id(browser, "gen-steps").send_keys(Keys.ENTER)
        assert finish(browser, "generate") == "Done: 4 images, seeds 0 to 3."
        screenshot(browser, shots / "generate-360px.png")
        assert console_errors(browser) == []
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_edit_shows_the_source_the_edit_and_a_strength_sweep(browser: Any, server: str, api: httpx.Client,
                                                               shots: Path) -> None:
    """The Edit tab: a dropped image, its source class, the target class of the model settings and the strength
    slider; the edit is /edit's answer, and the sweep shows /edit at each strength."""
    image = api.post("/generate", json={"model": "tiny-cond", "steps": 4, "seed": 5},
                     headers={"accept": "image/png"}).content
    b64 = base64.b64encode(image).decode()
    open_page(browser, server)
    choose(browser, "model", "tiny-cond (vp, 8×8, grey, conditional)")
    choose(browser, "class-label", "dog")
    fill(browser, "guidance", 2)
    browser.find_element("id", "tab-edit").click()
    drop = """const [zone, b64, name] = arguments;
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const files = new DataTransfer();
      files.items.add(new File([bytes], name, {type: "image/png"}));
      zone.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));"""
    browser.execute_script(drop, by_id(browser, "edit-drop"), b64, "dropped.png")
    assert str(by_id(browser, "edit-source").get_attribute("src")).startswith("blob:")
    choose(browser, "edit-source-class", "cat")
    browser.execute_script("const s = arguments[0]; s.value = '0.5'; s.dispatchEvent(new Event('input'));",
                           by_id(browser, "edit-strength"))
    assert by_id(browser, "edit-strength-value").text == "0.50"
    fill(browser, "edit-steps", 6)
    said = run(browser, "edit")
    assert said.startswith("Done: k = 3 of S = 6 steps each way"), said
    body = {"model": "tiny-cond", "images": [b64], "steps": 6, "class_label": 1, "guidance_scale": 2,
            "source_class_label": 0}
    answer = api.post("/edit", json={**body, "strength": 0.5}).json()
    assert sources(browser, "#edit-result") == data_urls(answer["images"])
    sweep = sources(browser, "#edit-sweep img")
    assert len(sweep) == 5
    assert sweep[-1] == data_urls(api.post("/edit", json={**body, "strength": 1.0}).json()["images"])[0]
    screenshot(browser, shots / "edit.png")
    assert_local(server, requests_sent(browser))
    assert console_errors(browser) == []
