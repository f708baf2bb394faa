"""The self-serve page in a real browser (Debian's chromium) against the API and the RBAC-enforcing emulator.

The whole life (submit -> Succeeded -> adapter) is test_life_ui.py; these are the small, fast views: what an
anonymous visitor gets, a bad field's error beside it, a refused namespace, axe-core, a phone's width.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from kt_api import JOB, Stack, stack_factory
from kt_browser import PHONE, tab
from kt_proxy import CuttableProxy, HeaderProxy
from playwright.async_api import Browser, Request, Route, expect

ROOT = Path(__file__).resolve().parents[2]


def cli_errors(job: dict[str, Any], folder: Path) -> list[str]:
    """What `kubetune plan -f` prints for this job, one line per problem (without its `error: ` prefix)."""
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run = subprocess.run([sys.executable, "-m", "kubetune.cli", "plan", "-f", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2, run
    return [line.removeprefix("error: ") for line in run.stderr.splitlines() if line.strip()]


async def test_anonymous_gets_the_page_and_no_data(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as anonymous:
        page = await anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "set-cookie" not in page.headers
        for name in ("app.js", "app.css", "vendor/js-yaml.min.js"):
            assert (await anonymous.get(f"/static/{name}")).status_code == 200, name
        assert (await anonymous.get("/static/../web.py")).status_code == 404
        assert (await anonymous.get("/static/index.html")).status_code == 404  # only the listed files
        assert (await anonymous.get("/v1/namespaces/team-a/finetunejobs")).status_code == 401


async def test_bad_token_is_refused(stack: Stack, browser: Browser) -> None:
    async with tab(browser) as t:
        await t.page.goto(stack.url + "/")
        await t.page.get_by_label("Bearer token").fill("not-a-token")
        await t.page.get_by_role("button", name="Sign in").click()
        await t.page.get_by_text("This token was not accepted").wait_for()
        assert await t.page.evaluate("sessionStorage.length") == 0
        assert await t.page.context.cookies() == []


async def test_bad_field_shows_the_cli_line_beside_it(stack: Stack, browser: Browser, tmp_path: Path) -> None:
    bad = {**JOB, "spec": {**JOB["spec"], "lora": {"r": -4}}}
    expected = cli_errors(bad, tmp_path)
    assert expected == ["spec.lora.r: must be >= 1, got -4"]
    async with tab(browser) as t:
        await t.sign_in(stack.url, "team-a-token")
        await t.open_namespace("team-a")
        await t.page.get_by_role("link", name="New job").click()  # this time uploaded as a file
        await t.page.locator("#fields fieldset").first.wait_for()
        (tmp_path / "upload.yaml").write_text(yaml.safe_dump(bad))
        await t.page.get_by_label("Or upload a YAML file").set_input_files(tmp_path / "upload.yaml")
        await expect(t.page.get_by_label("r", exact=True)).to_have_value("-4")  # the form follows the file
        await t.page.get_by_role("button", name="Plan").click()
        beside = t.page.locator("#f-spec-lora-r-err")
        await beside.wait_for()
        assert await beside.inner_text() == expected[0]
        field = t.page.get_by_label("r", exact=True)
        assert await field.get_attribute("aria-invalid") == "true"
        assert "f-spec-lora-r-err" in (await field.get_attribute("aria-describedby") or "")
        assert await t.page.locator("#form-errors li").all_inner_texts() == expected
        assert await t.page.get_by_role("button", name="Submit").is_disabled()
        await t.page.locator("#form-errors a").click()  # the summary's link moves focus to the field
        assert await t.page.evaluate("document.activeElement.id") == "f-spec-lora-r"
        assert await t.page.evaluate("document.querySelector('#job-form').scrollTop") > 0  # the field in sight
        await t.shot("new-job-error", full_page=False)
        # fixed in the form, the YAML follows and the plan goes through
        await field.fill("8")
        assert "r: 8" in await t.page.get_by_label("FineTuneJob YAML").input_value()
        await t.page.get_by_role("button", name="Plan").click()
        await t.page.locator("#plan .gpu-class").wait_for()
        assert await t.page.locator(".field-error").count() == 0
    assert not stack.kube.items("finetunejobs", "team-a")  # planning creates nothing


async def test_a_namespace_the_token_may_not_use_is_refused(stack: Stack, browser: Browser) -> None:
    async with tab(browser) as t:
        await t.sign_in(stack.url, "team-a-token")
        await t.open_namespace("team-b")  # alice has no rights there (bob's team)
        refused = t.page.locator("#jobs-error")
        await refused.get_by_text('Refused: you may not use the namespace "team-b"').wait_for()
        assert "may not list finetunejobs" in await refused.inner_text()
        assert await t.page.locator("#jobs-table").is_hidden()
        assert await t.page.get_by_text("No FineTuneJobs").is_hidden()  # not "empty": refused
        assert await t.page.get_by_role("link", name="New job").is_hidden()
        await t.shot("namespace-refused")


async def test_accessible_and_readable_on_a_phone(stack: Stack, browser: Browser) -> None:
    for viewport, suffix in ((None, ""), (PHONE, "-phone")):
        async with tab(browser, **({"viewport": viewport} if viewport else {})) as t:
            desktop = viewport is None  # axe-core once per view on the desktop; the plan view at both widths
            await t.sign_in(stack.url, "team-a-token")
            assert not desktop or await t.axe() == [], "sign-in/namespace view"
            await t.open_namespace("team-a")
            await t.page.locator("#jobs-table").wait_for()
            assert not desktop or await t.axe() == [], "job list"
            await t.paste_job(yaml.safe_dump(JOB))
            await t.page.get_by_role("button", name="Plan").click()
            await t.page.locator("#plan .gpu-class").wait_for()
            await t.page.get_by_text("GPU classes the planner sees").click()  # the catalog, opened
            assert await t.page.locator("#gpus-table tbody tr").count() >= 5
            assert "meta-llama/Llama-3.1-8B" in await t.page.locator("#model-list option").evaluate_all(
                "o => o.map(x => x.value)")
            assert await t.axe() == [], "new job with its plan"
            overflow = await t.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the page scrolls sideways by {overflow}px at {viewport}"
            if viewport:  # the phone: what one screen shows around the plan's headline
                await t.page.locator("#plan").scroll_into_view_if_needed()
            await t.shot(f"plan{suffix}", full_page=viewport is None)
            # keyboard only: Tab reaches the Plan button and Enter plans
            await t.page.get_by_role("button", name="Plan").focus()
            await t.page.keyboard.press("Enter")
            await t.page.locator("#plan .gpu-class").wait_for()


async def test_the_quota_and_its_refusal_are_on_the_page(browser: Browser, tmp_path: Path) -> None:
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"namespaces": {"team-a": {"allowedGpuClasses": ["A10G"], "maxGpus": 2}}}))
    async with stack_factory(tmp_path)(quotas_file=str(quotas)) as stack, tab(browser) as t:
        await t.sign_in(stack.url, "team-a-token")
        await t.open_namespace("team-a")
        quota = t.page.locator("#quota-list")
        await quota.get_by_text("A10G").wait_for()
        assert "0 of 2" in await quota.inner_text()
        await t.paste_job(yaml.safe_dump(JOB))  # planned onto L4: a class team-a may not use
        await t.page.get_by_role("button", name="Plan").click()
        assert await t.page.locator("#plan .gpu-class").inner_text() == "L4 × 1"
        await t.page.get_by_role("button", name="Submit").click()
        refused = t.page.locator("#form-errors")
        await refused.get_by_text("Refused by quota").wait_for()
        assert "allowedGpuClasses" in await refused.inner_text()
        await t.shot("quota-refused", full_page=False)
    assert not stack.kube.items("finetunejobs", "team-a")


async def test_the_list_stays_live_across_a_dropped_stream(stack: Stack, browser: Browser) -> None:
    """The page reads the event stream with fetch(); when the connection drops it reconnects with Last-Event-ID
    and a job created while it was cut off still appears (replayed), with no reload."""
    async def create(name: str) -> None:
        response = await stack.client.post("/v1/namespaces/team-a/finetunejobs",
                                           json={**JOB, "metadata": {"name": name}})
        assert response.status_code == 201, response.text

    port = int(stack.url.rsplit(":", 1)[1])
    async with CuttableProxy(port) as proxy, tab(browser) as t:
        streams: list[Request] = []
        t.page.on("request", lambda r: streams.append(r) if r.url.endswith("/v1/namespaces/team-a/events") else None)
        await t.sign_in(proxy.url, "team-a-token")
        await t.open_namespace("team-a")
        await t.page.locator("#status", has_text="Jobs in team-a: live").wait_for()
        await create("before-the-cut")
        rows = t.page.locator("#jobs-table tbody td:first-child")
        await rows.get_by_text("before-the-cut").wait_for()
        assert proxy.cut() >= 1
        await create("while-cut-off")
        await rows.get_by_text("while-cut-off").wait_for()
        assert len(streams) >= 2, [r.url for r in streams]
        resumed = await streams[-1].all_headers()
        assert resumed.get("last-event-id"), resumed  # resumed after the last message it had, not from scratch
        assert "authorization" in resumed and "token" not in streams[-1].url
        assert await t.page.locator("#status").inner_text() == "Jobs in team-a: live"
        name = t.page.locator("#jobs-table th[data-key=name]")  # sortable: by keyboard too
        await name.get_by_role("button").focus()
        await t.page.keyboard.press("Enter")
        assert await name.get_attribute("aria-sort") == "ascending"
        assert await rows.all_inner_texts() == ["before-the-cut", "while-cut-off"]
        await t.page.keyboard.press("Enter")
        assert await rows.all_inner_texts() == ["while-cut-off", "before-the-cut"]
        # delete from the job's page (confirmed): the list drops it live
        t.page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        # Until the job has loaded its buttons are disabled: they would act on no job, or on the one shown before.
        held = asyncio.Event()

        async def hold(route: Route) -> None:
            await held.wait()
            await route.continue_()

        await t.page.route("**/finetunejobs/while-cut-off", hold)
        await rows.get_by_role("link", name="while-cut-off").click()
        await t.page.locator("#job-title", has_text="while-cut-off").wait_for()
        delete = t.page.get_by_role("button", name="Delete")
        await expect(delete).to_be_disabled()
        held.set()
        await expect(delete).to_be_enabled()
        await t.page.unroute("**/finetunejobs/while-cut-off")
        await delete.click()
        await t.page.locator("#jobs-title", has_text="Jobs in team-a").wait_for()
        await expect(rows.get_by_text("while-cut-off")).to_have_count(0)
        await expect(rows.get_by_text("before-the-cut")).to_have_count(1)
        assert stack.kube.read("finetunejobs", "team-a", "while-cut-off") is None


async def test_behind_an_oidc_proxy_there_is_no_token_prompt(stack: Stack, browser: Browser) -> None:
    async with HeaderProxy(stack.url, "team-a-token") as proxy, tab(browser) as t:
        await t.page.goto(proxy.url + "/#/ns/team-a")
        await t.page.locator("#status", has_text="Jobs in team-a: live").wait_for()
        assert await t.page.locator("#view-signin").is_hidden()
        assert await t.page.get_by_role("button", name="Sign out").is_hidden()  # sign out at the proxy
        assert await t.page.evaluate("sessionStorage.length") == 0  # the page never saw the token
        assert await t.page.locator("#jobs-table").is_visible()
