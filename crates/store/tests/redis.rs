//! The conformance suite on a real `redis-server` and a real `valkey-server`, plus what only a
//! networked store has: upstream wire compatibility, outages, and O(log N + k) listings.

use std::time::{Duration, Instant};

use agentcube_store::testing::{BlackHole, Fixture, Flavor, ServerProcess, cases};
use agentcube_store::{Error, RedisConfig, RedisStore, SessionStore};

mod redis_server {
    use super::*;
    agentcube_store::conformance_tests!(Fixture::server(Flavor::Redis));
}

mod valkey_server {
    use super::*;
    agentcube_store::conformance_tests!(Fixture::server(Flavor::Valkey));
}

fn store_on(server: &ServerProcess) -> RedisStore {
    let mut c = RedisConfig::new(server.url());
    c.op_timeout = Duration::from_millis(500);
    c.connect_timeout = Duration::from_millis(300);
    RedisStore::new(c).unwrap()
}

async fn raw(server: &ServerProcess) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The record of spec §4.3, exactly as an upstream component writes it.
const UPSTREAM: &str = r#"{"kind":"Sandbox","sandboxId":"5c1e","sandboxNamespace":"default","name":"my-interpreter-k3j9x0ab","entryPoints":[{"path":"/","protocol":"HTTP","endpoint":"10.244.0.12:8080"}],"sessionId":"0b6f","ownerId":"user-sub","createdAt":"2026-08-03T04:05:06.123456789Z","expiresAt":"2026-08-03T12:05:06Z","idleTimeout":"15m0s","status":"ready"}"#;

#[tokio::test]
async fn reads_what_upstream_wrote_and_writes_what_upstream_reads() {
    for flavor in [Flavor::Redis, Flavor::Valkey] {
        let server = ServerProcess::start(flavor);
        let mut con = raw(&server).await;
        // Upstream's StoreSandbox: SETNX + two ZADDs, no TTL.
        let () = redis::pipe()
            .cmd("SETNX")
            .arg("session:0b6f")
            .arg(UPSTREAM)
            .ignore()
            .cmd("ZADD")
            .arg("session:expiry")
            .arg(1785744306)
            .arg("0b6f")
            .ignore()
            .cmd("ZADD")
            .arg("session:last_activity")
            .arg(1785715506)
            .arg("0b6f")
            .ignore()
            .query_async(&mut con)
            .await
            .unwrap();
        let store = store_on(&server);
        let rec = store.get("0b6f").await.unwrap();
        assert_eq!(rec.owner_id.as_deref(), Some("user-sub"));
        assert_eq!(rec.entry_points()[0].endpoint, "10.244.0.12:8080");
        let expired = store
            .list_expired("2026-08-03T12:05:06Z".parse().unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(expired, vec![rec.clone()]);

        // Ours, read raw: same key, same JSON bytes, integer-second scores, no TTL.
        let mut ours = cases::record("ours-1", 60);
        ours.idle_timeout = agentcube_types::GoDuration(Duration::from_secs(900));
        store.insert(&ours, ours.created_at).await.unwrap();
        let json: String = redis::cmd("GET")
            .arg("session:ours-1")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(json, serde_json::to_string(&ours).unwrap());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for field in [
            "kind",
            "sandboxId",
            "sandboxNamespace",
            "name",
            "entryPoints",
            "sessionId",
            "createdAt",
            "expiresAt",
            "idleTimeout",
            "status",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(
            (v["idleTimeout"].as_str(), v["status"].as_str()),
            (Some("15m0s"), Some("creating"))
        );
        assert!(v["entryPoints"].is_null());
        let ttl: i64 = redis::cmd("TTL")
            .arg("session:ours-1")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(ttl, -1);
        let score: String = redis::cmd("ZSCORE")
            .arg("session:expiry")
            .arg("ours-1")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(score, ours.expires_at.as_second().to_string());
        let score: String = redis::cmd("ZSCORE")
            .arg("session:last_activity")
            .arg("ours-1")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(score, ours.created_at.as_second().to_string());
        // Upstream's delete (DEL + ZREM) on our record leaves nothing our store would list.
        store.delete("0b6f").await.unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg("session:0b6f")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(exists, 0);
    }
}

#[tokio::test]
async fn redis_down_fails_fast_and_recovers() {
    let mut server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    store
        .insert(&cases::record("live", 100), jiff::Timestamp::now())
        .await
        .unwrap();
    server.stop();
    for _ in 0..3 {
        // The hang guard is generous; the store's own bound (500 ms) is what answers.
        let r = tokio::time::timeout(Duration::from_secs(10), store.get("live"))
            .await
            .expect("store call hung");
        assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            store.touch_many(&[("live".into(), jiff::Timestamp::now())]),
        )
        .await
        .expect("store call hung");
        assert!(r.as_ref().is_err_and(Error::is_unavailable), "{r:?}");
    }
    server.restart();
    // The data is gone (no persistence in this test server), but the store reconnects by itself.
    let mut recovered = false;
    for _ in 0..50 {
        match store.ping().await {
            Ok(()) => {
                recovered = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(recovered, "store did not reconnect after Redis came back");
    store
        .insert(&cases::record("after", 100), jiff::Timestamp::now())
        .await
        .unwrap();
    assert_eq!(store.get("after").await.unwrap().session_id, "after");
}

#[tokio::test]
async fn unreachable_at_start_is_unavailable_not_fatal() {
    let mut server = ServerProcess::start(Flavor::Redis);
    server.stop();
    let store = store_on(&server);
    assert!(store.ping().await.unwrap_err().is_unavailable());
    server.restart();
    store.ping().await.unwrap();
}

/// A Redis with persistence comes back `LOADING` its dataset, and answers every command so
/// until it is done: that is "try again later" (the Router's `503 STORE_UNAVAILABLE`, the
/// Workload Manager's wait at start), not a backend error (a `500`).
#[tokio::test]
async fn a_redis_loading_its_dataset_is_unavailable_until_loaded() {
    let mut server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    store.ping().await.unwrap();
    server.restart_loading(20_000, Duration::from_micros(150));
    // The first call may find the old connection broken; every failure is "unavailable".
    let (mut loading, deadline) = (0, Instant::now() + Duration::from_secs(30));
    loop {
        let e = match store.get("s").await {
            Err(Error::NotFound) => break,
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert!(e.is_unavailable(), "{e}");
        loading += usize::from(e.to_string().contains("loading the dataset"));
        assert!(Instant::now() < deadline, "never done loading");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(loading >= 5, "seen loading {loading} times");
}

/// Writes a Redis refuses for now are "try again later" too: a replica (its primary failed
/// over and the address still names it) answers `READONLY`, a full one under `noeviction`
/// answers `OOM`. Reads go on; writes come back once it is writable again.
#[tokio::test]
async fn writes_refused_as_readonly_or_out_of_memory_are_unavailable() {
    let server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    let t0 = jiff::Timestamp::UNIX_EPOCH;
    store
        .insert(&cases::record("before", 10), t0)
        .await
        .unwrap();
    let other = ServerProcess::start(Flavor::Redis);
    let replica = format!("REPLICAOF 127.0.0.1 {}", other.port());
    assert!(
        server
            .command(&replica)
            .is_some_and(|r| r.starts_with("+OK"))
    );
    let e = store
        .insert(&cases::record("ro", 10), t0)
        .await
        .unwrap_err();
    assert!(
        e.is_unavailable() && e.to_string().contains("read only replica"),
        "{e}"
    );
    assert!(
        server
            .command("REPLICAOF NO ONE")
            .is_some_and(|r| r.starts_with("+OK"))
    );
    // Full: the limit below what it holds, nothing may be evicted.
    for cmd in [
        "CONFIG SET maxmemory-policy noeviction",
        "CONFIG SET maxmemory 1",
    ] {
        assert!(
            server.command(cmd).is_some_and(|r| r.starts_with("+OK")),
            "{cmd}"
        );
    }
    let e = store
        .insert(&cases::record("oom", 10), t0)
        .await
        .unwrap_err();
    assert!(e.is_unavailable() && e.to_string().contains("OOM"), "{e}");
    assert!(
        server
            .command("CONFIG SET maxmemory 0")
            .is_some_and(|r| r.starts_with("+OK"))
    );
    store.insert(&cases::record("after", 10), t0).await.unwrap();
}

fn commandstats(server: &ServerProcess) -> std::collections::HashMap<String, u64> {
    let info = server.command("INFO commandstats").unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn listings_cost_log_n_plus_k_on_20k_sessions() {
    let server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    let mut con = raw(&server).await;
    // Load 20k sessions in pipelined batches (the store's own insert is one round trip each).
    let base = jiff::Timestamp::now().as_second();
    for chunk in (0..20_000).collect::<Vec<i64>>().chunks(2000) {
        let mut p = redis::pipe();
        for i in chunk {
            let mut r = cases::record(&format!("bulk-{i}"), 0);
            r.expires_at = jiff::Timestamp::from_second(base + i).unwrap();
            p.cmd("SET")
                .arg(format!("session:bulk-{i}"))
                .arg(serde_json::to_string(&r).unwrap())
                .ignore();
            p.cmd("ZADD")
                .arg("session:expiry")
                .arg(base + i)
                .arg(format!("bulk-{i}"))
                .ignore();
            p.cmd("ZADD")
                .arg("session:last_activity")
                .arg(base + i)
                .arg(format!("bulk-{i}"))
                .ignore();
        }
        let () = p.query_async(&mut con).await.unwrap();
    }
    let before = commandstats(&server);
    let t = jiff::Timestamp::from_second(base + 1_000_000).unwrap();
    let expired = store.list_expired(t, 25).await.unwrap();
    let idle = store.list_idle(t, 0, 25).await.unwrap();
    let after = commandstats(&server);
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    assert_eq!((expired.len(), idle.len()), (25, 25));
    assert_eq!(expired[0].session_id, "bulk-0");
    assert_eq!(delta("zrangebyscore"), 2, "one range query per listing");
    assert_eq!(
        delta("get"),
        50,
        "one GET per returned session, not per stored session"
    );
    for scan in ["scan", "keys", "zrange", "zcard", "mget"] {
        assert_eq!(delta(scan), 0, "{scan} must not be used");
    }
}

#[tokio::test]
async fn dangling_index_entries_are_dropped() {
    let server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    let mut con = raw(&server).await;
    store
        .insert(&cases::record("gone", 10), jiff::Timestamp::UNIX_EPOCH)
        .await
        .unwrap();
    // Someone deleted the record but not the indexes (e.g. an older component crashed midway).
    let () = redis::cmd("DEL")
        .arg("session:gone")
        .query_async(&mut con)
        .await
        .unwrap();
    let far = jiff::Timestamp::from_second(4_000_000_000).unwrap();
    assert!(store.list_expired(far, 10).await.unwrap().is_empty());
    let n: i64 = redis::cmd("ZCARD")
        .arg("session:expiry")
        .query_async(&mut con)
        .await
        .unwrap();
    let m: i64 = redis::cmd("ZCARD")
        .arg("session:last_activity")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!((n, m), (0, 0));
}

/// A page is read on past index entries whose record vanished: a page shorter than its limit
/// is the end (GC stops reading there), so those entries must not cut it short.
#[tokio::test]
async fn a_page_is_refilled_past_index_entries_of_vanished_records() {
    let server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    let mut con = raw(&server).await;
    let at = |s: i64| jiff::Timestamp::from_second(s).unwrap();
    for (i, id) in ["gone-0", "gone-1", "gone-2", "live-0", "live-1", "live-2"]
        .iter()
        .enumerate()
    {
        let mut r = cases::record(id, 10);
        r.expires_at = at(100 + i as i64);
        store.insert(&r, at(i as i64)).await.unwrap();
    }
    for id in ["gone-0", "gone-1", "gone-2"] {
        let () = redis::cmd("DEL")
            .arg(format!("session:{id}"))
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let ids = |v: Vec<String>| v.join(",");
    let idle = store.list_idle(at(1000), 0, 2).await.unwrap();
    let idle = ids(idle.into_iter().map(|s| s.record.session_id).collect());
    assert_eq!(idle, "live-0,live-1");
    let idle = store.list_idle(at(1000), 2, 2).await.unwrap();
    assert_eq!(
        ids(idle.into_iter().map(|s| s.record.session_id).collect()),
        "live-2"
    );
    let expired = store.list_expired(at(1000), 3).await.unwrap();
    let expired = ids(expired.into_iter().map(|r| r.session_id).collect());
    assert_eq!(expired, "live-0,live-1,live-2");
}

/// The client ports of the server's connections other than `raw`'s own.
async fn client_ports(con: &mut redis::aio::MultiplexedConnection) -> Vec<u16> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(con)
        .await
        .unwrap();
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| {
            let addr = l.split(' ').find_map(|f| f.strip_prefix("addr="))?;
            addr.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// A connection whose packets stop arriving (a node gone without a word, a load balancer that
/// dropped an idle flow) is given up within seconds and made anew. redis-rs reconnects only on
/// errors that say the connection is gone, never on a command that timed out, so every command
/// timed out until the kernel gave up retransmitting — about 15 minutes without a store.
#[tokio::test]
async fn a_connection_that_went_silent_is_replaced() {
    let server = ServerProcess::start(Flavor::Redis);
    let store = store_on(&server);
    store.ping().await.unwrap();
    let mut con = raw(&server).await;
    let before = client_ports(&mut con).await;
    assert_eq!(before.len(), 1, "{before:?}");
    let hole = BlackHole::connection(before[0], server.port());
    let started = std::time::Instant::now();
    let mut failed = 0;
    while store.ping().await.is_err() {
        failed += 1;
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "still no store after {:?} ({failed} failed pings)",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(failed > 0, "the black hole took the connection");
    // On a new connection (the server still lists the old one: its close was dropped too).
    let after = client_ports(&mut con).await;
    assert!(
        after.iter().any(|p| *p != before[0]),
        "{before:?} {after:?}"
    );
    assert!(started.elapsed() < agentcube_store::redis::UNACKED_TIMEOUT * 3);
    drop(hole);
}

/// A store reached over TLS (`rediss://`, extension): the server's certificate is checked
/// against the configured CA (not the system's when one is given), and a server that asks for
/// a client certificate gets the configured one.
#[tokio::test]
async fn a_store_over_tls_checks_the_server_and_shows_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki =
        agentcube_test_cluster::certs::Pki::write(dir.path(), &[("store", "s", None)]).unwrap();
    let (cert, key) = pki.client("store");
    let tls = |ca: bool, client: bool| agentcube_store::RedisTls {
        ca: ca.then(|| pki.ca_cert()),
        client: client.then(|| (cert.clone(), key.clone())),
    };
    let over_tls = |server: &ServerProcess, host: &str, tls: agentcube_store::RedisTls| {
        let mut c = RedisConfig::new(format!("rediss://{host}:{}/", server.port()));
        c.tls = tls;
        RedisStore::new(c).unwrap()
    };
    let server =
        ServerProcess::start_tls(&pki.server_cert(), &pki.server_key(), &pki.ca_cert(), false);
    let store = over_tls(&server, "127.0.0.1", tls(true, false));
    store.ping().await.unwrap();
    store
        .insert(&cases::record("t", 10), jiff::Timestamp::UNIX_EPOCH)
        .await
        .unwrap();
    assert_eq!(store.get("t").await.unwrap().session_id, "t");
    // The system's CAs do not know this one; nor does the certificate name another host.
    for (host, ca) in [("127.0.0.1", false), ("127.0.0.2", true)] {
        let e = over_tls(&server, host, tls(ca, false))
            .ping()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{host}: {e}");
        assert!(
            !e.is_unavailable(),
            "a refused certificate is not an outage: {e}"
        );
    }
    // Plain Redis protocol to a TLS port gets nothing back.
    let plain = RedisStore::new(RedisConfig::new(format!(
        "redis://127.0.0.1:{}/",
        server.port()
    )))
    .unwrap();
    assert!(plain.ping().await.is_err());

    let server =
        ServerProcess::start_tls(&pki.server_cert(), &pki.server_key(), &pki.ca_cert(), true);
    over_tls(&server, "127.0.0.1", tls(true, true))
        .ping()
        .await
        .unwrap();
    let e = over_tls(&server, "127.0.0.1", tls(true, false))
        .ping()
        .await
        .unwrap_err();
    assert!(
        !e.is_unavailable(),
        "a refused handshake is not an outage: {e}"
    );
}

/// A renewed client certificate (or CA) is picked up without a restart: the files are read again
/// when a handshake is refused, and the next call connects with them. redis-rs reconnects with
/// what it was made with, so before, an expired client certificate was refused until a restart.
#[tokio::test]
async fn renewed_tls_files_are_used_once_the_old_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str| {
        agentcube_test_cluster::certs::Pki::write(&dir.path().join(name), &[("store", "s", None)])
            .unwrap()
    };
    let (old, new) = (write("old"), write("new"));
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let install = |pki: &agentcube_test_cluster::certs::Pki| {
        let (cert, key) = pki.client("store");
        std::fs::copy(pki.ca_cert(), files.join("ca.crt")).unwrap();
        std::fs::copy(cert, files.join("tls.crt")).unwrap();
        std::fs::copy(key, files.join("tls.key")).unwrap();
    };
    install(&old);
    let mut server =
        ServerProcess::start_tls(&old.server_cert(), &old.server_key(), &old.ca_cert(), true);
    let mut c = RedisConfig::new(format!("rediss://127.0.0.1:{}/", server.port()));
    c.tls = agentcube_store::RedisTls {
        ca: Some(files.join("ca.crt")),
        client: Some((files.join("tls.crt"), files.join("tls.key"))),
    };
    let store = RedisStore::new(c).unwrap();
    store.ping().await.unwrap();
    // Renewed: another CA signs the server's certificate and must sign the clients'.
    install(&new);
    server.restart_tls(&new.server_cert(), &new.server_key(), &new.ca_cert(), true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(Instant::now() < deadline, "still refused: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
