"""The edge serves every route of the table without FastAPI: FastAPI (~0.25 s of imports, a
quarter of the cold-start budget) is imported only when the schema is asked for.

Checked in a fresh interpreter, since this test process imports FastAPI itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.http_world import BTC, MODEL, SIGNAL, TOKEN, World

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import httpx
    from sigserve.api import create_app
    from sigserve.config import Settings

    home, token, signal, model, symbol, features = sys.argv[1:7]
    features = json.loads(features)

    async def main():
        app = create_app(Settings(home=home, auth_token=token, default_signal=signal))
        seen = {}
        async with app.running():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://edge.test",
                                         headers={"Authorization": f"Bearer {token}"}) as client:
                answers = [
                    (await client.post("/api/v1/predict", json={"symbol": symbol, "features": features})).status_code,
                    (await client.get("/healthz")).status_code,
                    (await client.get("/models")).status_code,
                    (await client.get(f"/models/{model}")).status_code,
                    (await client.get("/models/nope")).json()["error_code"],
                    (await client.get("/nowhere")).json()["error_code"],
                    (await client.put("/models")).json()["error_code"],
                ]
                seen["before_schema"] = "fastapi" in sys.modules
                schema = (await client.get("/openapi.json")).json()
                seen["after_schema"] = "fastapi" in sys.modules
                seen["paths"] = sorted(schema["paths"])
        print(json.dumps({"answers": answers, **seen}))

    asyncio.run(main())
""")


def test_fastapi_is_imported_only_for_the_schema(home: Path, world: World) -> None:
    features = json.dumps(world.feature_dict(BTC, 300))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(home), TOKEN, SIGNAL, MODEL, BTC, features],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["answers"] == [200, 200, 200, 200, "model_not_found", "route_not_found",
                               "method_not_allowed"]
    assert seen["before_schema"] is False
    assert seen["after_schema"] is True
    assert {"/api/v1/predict", "/inference/run", "/models/{name}", "/healthz"} <= set(seen["paths"])
