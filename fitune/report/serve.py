"""``fitune ui [DIR]`` (and ``fitune report RUN_DIR --serve``): the run pages served live on this machine.

A page is the report (``fitune/report/page.py``) with a live script: the server watches the run folder
(its rows and its marker, every half second) and sends a server-sent event when something changed; the page
then fetches the new figures and redraws. A reload shows the folder as it is then. The list at ``/`` holds
every run folder under DIR, and the recipes given with ``--recipe``, each with its plan page (phases,
categories, the op and module at the peak, the steady step op by op); every run has its plan page too. Nothing
binds beyond 127.0.0.1 unless ``--host`` says so.
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path

from fitune.errors import FituneError
from fitune.report.charts import charts
from fitune.report.page import CSS, STATUS_WORDS, data, plan_page, render
from fitune.report.records import read_rows, read_run
from fitune.trainer.listeners import EVALS, METRICS, SAMPLES
from fitune.trainer.runfolder import RUN_MARKER, read_marker

WATCHED = (METRICS, EVALS, SAMPLES, RUN_MARKER)
POLL_S = 0.5
HEARTBEAT_S = 15.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def folder_state(out: Path) -> tuple:
    """What changes when the run writes: size and modification time of each watched file."""
    state = []
    for name in WATCHED:
        try:
            st = (out / name).stat()
            state.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            state.append((name, None, None))
    return tuple(state)


def run_folders(root: Path) -> list[tuple[Path, dict]]:
    """The run folders directly under ``root``, the latest started first."""
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        marker = read_marker(child) if child.is_dir() else None
        if marker is not None:
            found.append((child, marker))
    return sorted(found, key=lambda x: x[1].get("started", ""), reverse=True)


def list_page(root: Path, recipes: list[Path] = ()) -> str:
    rows = []
    for out, marker in run_folders(root):
        status = marker.get("status", "unknown")
        word, color = STATUS_WORDS.get(status, (status, "#555"))
        steps = read_rows(out / METRICS)
        last = steps[-1] if steps else {}
        total = marker.get("total_steps") or marker.get("steps")
        step = f"{last.get('step', 0)}" + (f" / {total}" if total else "")
        loss = f"{last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else "—"
        rows.append(
            f'<tr><td><a href="/run/{html.escape(out.name)}">{html.escape(out.name)}</a></td>'
            f'<td><span class="badge" style="background:{color}">{html.escape(word)}</span></td>'
            f"<td>{step}</td><td>{loss}</td><td>{html.escape(marker.get('started', ''))}</td></tr>"
        )
    body = (
        '<table class="samples"><tr><th>run</th><th>status</th><th>step</th><th>loss</th><th>started</th></tr>'
        + "".join(rows)
        + "</table>"
        if rows
        else f"<p>No run folder under {html.escape(str(root))} yet.</p>"
    )
    if recipes:
        links = "".join(
            f'<li><a href="/plan/{i}">{html.escape(str(p))}</a></li>' for i, p in enumerate(recipes)
        )
        body += f"<h2>Plans of recipes</h2><ul>{links}</ul>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta http-equiv="refresh" content="5">
<title>fitune runs · {html.escape(str(root))}</title><style>{CSS}</style></head>
<body><h1>fitune runs</h1><div class="note">{html.escape(str(root.resolve()))}</div>{body}</body></html>
"""


def make_app(root: Path, recipes: list[Path] | None = None):
    """The Starlette app serving the runs under ``root``, and the plans of ``recipes`` (``/plan/N``, planned
    on the first visit, again when the file changes)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    root = Path(root)

    def folder(request) -> Path:
        name = request.path_params["name"]
        out = root / name
        if "/" in name or name in ("", ".", "..") or not out.is_dir() or read_marker(out) is None:
            raise HTTPException(404, f"no run folder {name!r} under {root}")
        return out

    recipes = list(recipes or [])
    planned: dict[int, tuple[float, str]] = {}  # recipe index -> (its file's mtime, the page)

    async def index(request):
        return HTMLResponse(list_page(root, recipes))

    async def run_plan(request):
        out = folder(request)
        rec = read_run(out)
        why = None if rec.plan else "this run folder holds no plan.json"
        return HTMLResponse(plan_page(f"{out.name}: the plan", rec.plan, why, back=f"/run/{out.name}"))

    def recipe_page(i: int) -> str:
        from fitune.preflight.run import environment_for, plan_for
        from fitune.recipe import Recipe

        path = recipes[i]
        try:
            recipe = Recipe.from_yaml(path)
            plan, why = plan_for(recipe, environment_for(recipe))
        except FituneError as exc:  # a recipe that does not load is said on its page
            plan, why = None, str(exc)
        return plan_page(f"{path.name}: the plan", plan.to_dict() if plan else None, why, back="/")

    async def recipe_plan(request):
        i = request.path_params["i"]
        if not 0 <= i < len(recipes):
            raise HTTPException(404, f"no recipe {i}; fitune ui was given {len(recipes)}")
        mtime = recipes[i].stat().st_mtime if recipes[i].is_file() else 0.0
        if i not in planned or planned[i][0] != mtime:
            page = await asyncio.to_thread(recipe_page, i)  # seconds of planning, off the event loop
            planned[i] = (mtime, page)
        return HTMLResponse(planned[i][1])

    async def page(request):
        out = folder(request)
        rec = read_run(out)
        base = f"/run/{out.name}"
        return HTMLResponse(render(rec, charts(rec), [], None, live=(f"{base}/data", f"{base}/events")))

    async def figures(request):
        rec = read_run(folder(request))
        return JSONResponse(data(rec, charts(rec)))

    async def events(request):
        out = folder(request)

        async def stream():
            seen = folder_state(out)
            quiet = 0.0
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                await asyncio.sleep(POLL_S)
                now = folder_state(out)
                if now != seen:
                    seen, quiet = now, 0.0
                    yield "data: changed\n\n"
                else:
                    quiet += POLL_S
                    if quiet >= HEARTBEAT_S:
                        quiet = 0.0
                        yield ": still here\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    return Starlette(
        routes=[
            Route("/", index),
            Route("/run/{name}", page),
            Route("/run/{name}/data", figures),
            Route("/run/{name}/events", events),
            Route("/run/{name}/plan", run_plan),
            Route("/plan/{i:int}", recipe_plan),
        ]
    )


def serve(
    root: Path, host: str, port: int, echo, open_run: str | None = None, recipes: list[Path] | None = None
) -> None:
    """Serve until Ctrl-C."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise FituneError(
            f"the live view needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            'installed; fix: pip install "fitune[ui]", or use fitune report RUN_DIR for the page as a file'
        )
    import socket

    import uvicorn

    try:  # a port in use is said in words, before the server would exit with a log line
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise FituneError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; fix: pass another --port"
        ) from exc
    if host not in LOOPBACK:
        echo(f"warning: serving on {host}: anyone who can reach it on port {port} sees these runs")
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    echo(
        f"fitune ui: {where}/"
        + (f"run/{open_run}" if open_run else "")
        + f" (runs under {root}); Ctrl-C stops"
    )
    uvicorn.run(make_app(root, recipes), host=host, port=port, log_level="warning")
