"""TLS: a real daemon serving wss:// and https:// with a self-signed certificate made at test time.

The certificate names 127.0.0.1 and localhost; clients that trust it (an ``ssl`` context, the
``--cacert`` option, ``$LRPILOT_CACERT``) connect, verifying the host name; clients that do not
fail with a certificate error, and the daemon keeps serving the others.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lrpilot import Client
from websockets.sync.client import connect

from monitor import cli, ops
from monitor.config import ConfigError, load_config
from tests._serve import source_env
from tests.daemon._daemon import ThreadedDaemon, make_config

ROOT = Path(__file__).resolve().parent.parent


def _make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509  # noqa: F401  (only to decide which tool to use)
    except ImportError:
        pass
    else:
        return _make_with_cryptography(cert, key)
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the 'cryptography' package nor the openssl CLI is available to make a certificate")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _make_with_cryptography(cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def trusted(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the test certificate (and checks the host name)."""
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture()
def daemon(
    tmp_path: Path, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[ThreadedDaemon]:
    monkeypatch.delenv("LRPILOT_CACERT", raising=False)
    monkeypatch.delenv("LRPILOT_TOKEN", raising=False)
    cert, key = certificate
    config = make_config(
        tmp_path,
        server={"tls_cert": str(cert), "tls_key": str(key)},
        # decisions apply 20 steps after the last reported one: the client applies each on time
        defaults={"apply_lead_steps": 20},
    )
    with ThreadedDaemon(config) as td:
        yield td


def _https(daemon: ThreadedDaemon, path: str) -> str:
    assert daemon.daemon is not None
    return f"https://127.0.0.1:{daemon.daemon.port}{path}"


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return int(response.status), response.read().decode()


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


#: an intermittent stall seen only with TLS on a loaded 2-core machine (about 1 handshake in
#: 10 with other CPU-bound processes running): websockets' sync client sends the upgrade
#: request and no response comes within the timeout. A timed-out opening handshake sends no
#: command, so the tests try once more rather than fail on it; any other error fails at once.
HANDSHAKE_STALL = "timed out while waiting for handshake response"


def _ops_call(command: str, **kwargs: Any) -> dict[str, Any]:
    for attempt in range(3):
        try:
            return ops.call(command, timeout=5, **kwargs)
        except ops.Unreachable as exc:
            if HANDSHAKE_STALL not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _received(client: Client) -> list[Any]:
    """Every decision the client received, applied or still pending, by id."""
    decisions = [d for d, _ in client.decisions] + client._state.pending
    return sorted(decisions, key=lambda d: d.id)


def _stream_until_decision(client: Client, start: int = 0) -> int:
    """Report a flat val_loss until the plateau policy's decision arrives; the next step.

    Waits for the connection first, for up to 30 s: in a full suite on 2 busy cores a TLS
    opening handshake has once taken longer than the client's 5 s connect timeout, and the
    client then retries after its backoff (the daemon's side of that stall is not understood
    yet; the test checks what happens once connected).
    """
    assert client.wait_connected(30), f"no connection: {client.stats.last_error}"
    step = start
    deadline = time.monotonic() + 10
    while client.stats.decisions_received == 0 and time.monotonic() < deadline:
        client.lrs_for_step(step)
        client.report(step, val_loss=1.0)
        step += 1
        time.sleep(0.01)
    return step


# ------------------------------------------------------------------------------ (a) the client


def test_client_streams_over_wss_and_follows_decisions(
    daemon: ThreadedDaemon, trusted: ssl.SSLContext, certificate: tuple[Path, Path]
) -> None:
    """lrpilot.Client with an ssl context connects over wss://, streams, and applies both the engine's and an operator's decision."""
    assert daemon.url.startswith("wss://127.0.0.1:")
    with Client(daemon.url, "tls-job", 0.1, ssl=trusted) as client:
        step = _stream_until_decision(client)
        assert client.stats.connects == 1 and client.stats.connect_failures == 0
        decision = _received(client)[0]
        assert decision.source == "reduce_on_plateau" and decision.lrs == (0.05,)
        assert client.lrs_for_step(decision.apply_at_step)[0] <= 0.05
        # an operator command over the same TLS listener reaches the job
        result = _ops_call(
            "set_lr", url=daemon.url, job="tls-job", lrs=[0.01], reason="tls test", actor="ops",
            cacert=str(certificate[0]),
        )  # fmt: skip
        manual = result["decision"]
        # by id: records still in flight may bring the plateau policy's next decision too
        _wait_for(lambda: any(d.id == manual["id"] for d in _received(client)))
        (got,) = [d for d in _received(client) if d.id == manual["id"]]
        assert got.actor == "ops" and got.lrs == (0.01,)
        client.lrs_for_step(max(step, manual["apply_at_step"]))
        assert manual["id"] in [d.id for d, _ in client.decisions]  # applied


def test_client_trusts_the_ca_file_named_by_the_environment(
    daemon: ThreadedDaemon, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an ssl argument, the client trusts $LRPILOT_CACERT for a wss:// URL."""
    monkeypatch.setenv("LRPILOT_CACERT", str(certificate[0]))
    with Client(daemon.url, "env-ca-job", 0.1) as client:
        _wait_for(lambda: client.stats.connects == 1)
        assert client.stats.connect_failures == 0


def test_ssl_context_with_a_plain_url_is_refused(trusted: ssl.SSLContext) -> None:
    """A TLS context passed with a ws:// URL is a mistake the constructor names."""
    with pytest.raises(ValueError, match=r"ssl: a TLS context needs a wss:// URL"):
        Client("ws://127.0.0.1:1/ws", "job", 0.1, ssl=trusted, start=False)


# ------------------------------------------------------------------------------ (b) HTTPS


def test_https_endpoints_answer_with_the_certificate_trusted(
    daemon: ThreadedDaemon, trusted: ssl.SSLContext
) -> None:
    """/healthz, /readyz and /api/jobs answer over https, and the API lists a job streamed over wss."""
    assert _get(_https(daemon, "/healthz"), trusted) == (200, "ok\n")
    assert _get(_https(daemon, "/readyz"), trusted) == (200, "ready\n")
    with Client(daemon.url, "api-job", 0.1, ssl=trusted) as client:
        client.report(0, val_loss=1.0)
        _wait_for(lambda: client.stats.sent_points == 1)
        _wait_for(lambda: "api-job" in _get(_https(daemon, "/api/jobs"), trusted)[1])
    status, body = _get(_https(daemon, "/api/jobs/api-job"), trusted)
    assert status == 200 and json.loads(body)["job"]["step"] == 0


# ------------------------------------------------------------------------------ (c) untrusted


def test_untrusted_clients_fail_with_a_certificate_error_and_others_are_served(
    daemon: ThreadedDaemon, trusted: ssl.SSLContext
) -> None:
    """Clients that do not trust the certificate get CERTIFICATE_VERIFY_FAILED; plain ws:// fails too; a trusted client is served afterwards."""
    with pytest.raises(urllib.error.URLError) as http_error:
        _get(_https(daemon, "/healthz"), None)
    assert isinstance(http_error.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(daemon.url, open_timeout=5)
    plain = daemon.url.replace("wss://", "ws://")
    with pytest.raises(Exception) as plain_error:  # the TLS listener does not speak plain HTTP
        connect(plain, open_timeout=5)
    assert not isinstance(plain_error.value, AssertionError)

    untrusted = Client(daemon.url, "untrusted-job", 0.1)
    try:
        _wait_for(lambda: untrusted.stats.connect_failures >= 1)
        assert untrusted.stats.connects == 0
        assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.stats.last_error)
        untrusted.report(0, val_loss=1.0)  # fail-open: training goes on
    finally:
        untrusted.close()

    assert _get(_https(daemon, "/healthz"), trusted) == (200, "ok\n")
    with Client(daemon.url, "after-job", 0.1, ssl=trusted) as client:
        _stream_until_decision(client)
        assert client.stats.decisions_received >= 1
    jobs = json.loads(_get(_https(daemon, "/api/jobs"), trusted)[1])["jobs"]
    assert {j["job"] for j in jobs} == {"after-job"}


# ------------------------------------------------------------------------------ (d) the CLI


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    for _ in range(3):  # see HANDSHAKE_STALL
        code = cli.main(argv)
        captured = capsys.readouterr()
        if HANDSHAKE_STALL not in captured.err:
            break
    return code, captured.out, captured.err


def test_operator_cli_with_cacert(
    daemon: ThreadedDaemon,
    certificate: tuple[Path, Path],
    trusted: ssl.SSLContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`lrpilot jobs/set-lr --cacert` work over wss://; without it the error says the certificate is not trusted and how to fix it."""
    cert = str(certificate[0])
    with Client(daemon.url, "cli-job", 0.1, ssl=trusted) as client:
        client.report(5, val_loss=0.5)
        _wait_for(lambda: client.stats.sent_points == 1)
        code, out, _ = _cli(["jobs", "--url", daemon.url, "--cacert", cert, "--json"], capsys)
        assert code == 0 and [j["job"] for j in json.loads(out)["jobs"]] == ["cli-job"]
        code, out, _ = _cli(
            ["set-lr", "cli-job", "0.02", "--url", daemon.url, "--cacert", cert, "--actor", "eve"],
            capsys,
        )
        assert code == 0 and "decision 1 (set_lr) sent" in out
        _wait_for(lambda: client.stats.decisions_received == 1)
        [decision] = _received(client)
        assert (decision.lrs, decision.actor) == ((0.02,), "eve")

    code, _, err = _cli(["status", "--url", daemon.url], capsys)
    assert code == 2
    assert "TLS certificate not trusted" in err and "--cacert FILE or $LRPILOT_CACERT" in err
    code, _, err = _cli(["status", "--url", daemon.url, "--cacert", cert + ".missing"], capsys)
    assert code == 2 and "--cacert: cannot load the CA file" in err and "No such file" in err
    assert _get(_https(daemon, "/healthz"), trusted)[0] == 200


@pytest.mark.slow
def test_operator_cli_process_reads_lrpilot_cacert(
    daemon: ThreadedDaemon, certificate: tuple[Path, Path]
) -> None:
    """The installed command line, run as a process, trusts the CA file named by $LRPILOT_CACERT."""
    env = {k: v for k, v in source_env().items() if not k.startswith("LRPILOT_")}
    env["LRPILOT_CACERT"] = str(certificate[0])
    done = subprocess.run(
        [sys.executable, "-m", "monitor", "status", "--url", daemon.url, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    assert status["url"] == daemon.url


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"tls_cert": "/srv/cert.pem"}, "server.tls_key: missing: tls_cert is set"),
        ({"tls_key": "/srv/key.pem"}, "server.tls_key: set without tls_cert"),
    ],
)
def test_half_a_tls_config_is_an_error_naming_the_field(
    tmp_path: Path, server: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only one of tls_cert / tls_key stops start-up with the file and the field, instead of serving plain ws://."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"server": server}), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert str(error.value).startswith(f"{path}: {message}")
    assert "Value error" not in str(error.value)
    code, _, err = _cli(["check-config", str(path)], capsys)
    assert code == 2 and message in err


def test_tls_pair_from_the_environment(tmp_path: Path) -> None:
    """The check also covers LRPILOT_SERVER__TLS_* overrides; both together are accepted."""
    with pytest.raises(ConfigError, match=r"^<defaults>: server\.tls_key: missing"):
        load_config(None, environ={"LRPILOT_SERVER__TLS_CERT": "/c.pem"})
    both = load_config(
        None, environ={"LRPILOT_SERVER__TLS_CERT": "/c.pem", "LRPILOT_SERVER__TLS_KEY": "/k.pem"}
    )
    assert (both.server.tls_cert, both.server.tls_key) == (Path("/c.pem"), Path("/k.pem"))


def test_ops_call_rejects_an_unreadable_ca_file() -> None:
    """ops.call names the CA file that cannot be loaded (not a daemon that seems down)."""
    with pytest.raises(ops.CAFileError, match=r"cannot load the CA file /nonexistent/ca\.pem"):
        ops.call("status", url="wss://127.0.0.1:1/ws", cacert="/nonexistent/ca.pem")
