"""TEST-ONLY mitmdump script: sets the flow's caller from the `x-test-caller` request header.

Never load this into a real gateway: it lets any client claim any identity. It stands in for the
auth addon in policy end-to-end tests until that addon is on the branch; when a real CallerAuth
has already set the caller (from a real token), the header is ignored.

Header format: `x-test-caller: <subject>;<group>,<group>...`. Loaded after addons/gateway.py
(`-s tests/support/test_caller.py`); mitmproxy runs `requestheaders` of every addon before the
Policy addon's `request` hook, so the order of `-s` scripts does not matter here.
"""

from mitmproxy import http

from sluicegate.mitm import flowstate


class TestCaller:
    __test__ = False  # a helper, not a test class

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        claimed = flow.request.headers.get("x-test-caller")
        st = flowstate.state(flow)
        if claimed is None or st.caller is not None:
            return
        subject, _, groups = claimed.partition(";")
        st.caller = flowstate.Caller(
            subject=subject,
            groups=tuple(g for g in groups.split(",") if g),
            issuer="https://idp.test.local",
            token_id=None,
            fingerprint="test-only",
        )


addons = [TestCaller()]
