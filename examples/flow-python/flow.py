#!/usr/bin/env python3
"""Jobs that wait for jobs, without the Rust SDK: submits `fetch` to queue FETCH and
`report` to queue REPORT waiting for it, following docs/protocol.md ("Dependencies and
children"), then waits for the report's outcome and prints it.

    python3 flow.py NATS_URL NAMESPACE FETCH REPORT

The rules it follows: a dependent's edges are written first, into each dependency's flow
stream (`conveyor.<ns>.<queue>.edge.<hex id>`, payload the dependent's reference), then the
dependent itself into its queue's waiting stream (`conveyor.<ns>.<queue>.waiting.<hex id>`)
with `Conveyor-After`. A job id is one subject token as the hex of its bytes.
"""

import asyncio
import sys

import nats


def hex_token(job_id: str) -> str:
    return job_id.encode().hex()


async def main(url: str, namespace: str, fetch: str, report: str) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    run = "py-1"
    fetch_id, report_id = f"fetch-{run}", f"report-{run}"

    # The dependent first is fine too: either order works. Here the dependent goes first.
    inbox = nc.new_inbox()
    outcomes = await nc.subscribe(inbox)
    me = f"{namespace}/{report}/{report_id}"
    await js.publish(
        f"conveyor.{namespace}.{fetch}.edge.{hex_token(fetch_id)}", me.encode()
    )
    await js.publish(
        f"conveyor.{namespace}.{report}.waiting.{hex_token(report_id)}",
        b"monthly report",
        headers={
            "Nats-Msg-Id": report_id,
            "Conveyor-Job-Id": report_id,
            # Its dependency, in another queue of the namespace; it fails if that fails.
            "Conveyor-After": f"{fetch}/{fetch_id};if-failed=fail",
            "Conveyor-Reply-To": inbox,
        },
    )
    # The dependency: a plain job at priority 0.
    await js.publish(
        f"conveyor.{namespace}.{fetch}.jobs.0",
        b"numbers",
        headers={"Nats-Msg-Id": fetch_id},
    )
    message = await outcomes.next_msg(timeout=60)
    status = message.headers.get("Conveyor-Status")
    print(f"{report_id} {status} {message.data.decode(errors='replace')}")
    await nc.close()
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(*sys.argv[1:])))
