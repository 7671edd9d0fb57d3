"""AUTH XOAUTH2 keeps within SMTP's 512-octet command line (RFC 5321 4.5.3.1.4): a token too long for the
AUTH line goes after the server's 334 challenge (RFC 4954 4). aiosmtpd, like Dovecot, refuses longer
command lines, so a token of each length either way of the limit must authenticate."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbound_relay.session import MAX_COMMAND_LINE
from tests.peers.certs import TLSFiles
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream

USER = "sender@example.com"
# The AUTH line around the token: "AUTH XOAUTH2 " + base64("user=U\x01auth=Bearer T\x01\x01") + CRLF.
FIXED = len("user=" + USER + "\x01auth=Bearer \x01\x01")
AT_LIMIT = ((MAX_COMMAND_LINE - len("AUTH XOAUTH2 \r\n")) // 4) * 3 - FIXED


@pytest.mark.parametrize("length", [20, AT_LIMIT, AT_LIMIT + 1, 1500, 4000])
async def test_tokens_of_any_length_authenticate(tls: TLSFiles, config_path: Path, length: int) -> None:
    token = ("t" * length)[:length]
    policy = {
        "name": "t/xoauth2", "type": "XOAUTH2", "user": USER, "password": token,
        "gateway": {"host": "127.0.0.1", "port": 0}, "tls": {"caFile": str(tls.ca_file)},
    }  # fmt: skip
    async with AuthUpstream(tls, tokens={USER: token}) as up:
        policy["gateway"] = {"host": "127.0.0.1", "port": up.port}
        write_config(config_path, {"policies": [policy]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["a@example.net"], message())
    assert outcome.code == 250, outcome
    assert up.auth_log == [("XOAUTH2", USER, True)]
