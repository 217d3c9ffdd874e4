//! [`RedisStore`]: one implementation for Redis and Valkey (same protocol).
//!
//! Writes that belong together run as one Lua script (atomic, one round trip): insert = `SET NX` +
//! two `ZADD`; delete = `DEL` + two `ZREM`; touch = `EXISTS` + `ZADD GT` (never resurrects, never
//! moves backwards); listing = `ZRANGEBYSCORE … LIMIT` + one `GET` per hit, dropping index entries
//! whose record vanished. The connection is made lazily and re-made by redis-rs's
//! `ConnectionManager` after an outage; every call is bounded by `op_timeout`. Over TLS
//! (`rediss://`), a refused handshake reads the CA and client certificate files again, and
//! when they changed the next call connects with a client made from them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentcube_types::SessionRecord;
use jiff::Timestamp;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use crate::keys::{Keys, check_id};
use crate::{
    Error, IdleSession, Page, Result, Scope, SessionStore, cursor_of, parse_cursor, score,
};

/// How to reach Redis or Valkey.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` (or `rediss://`).
    pub url: String,
    /// Key prefix; upstream's is `session:`. Tests use a random one.
    pub key_prefix: String,
    /// Upper bound of every store call (including a reconnect attempt).
    pub op_timeout: Duration,
    /// Upper bound of one connection attempt.
    pub connect_timeout: Duration,
    /// For a `rediss://` URL: the CA and client identity, when not the system's CAs and none.
    pub tls: RedisTls,
}

/// PEM files of a TLS connection to the store, read when the store is made and again when a
/// handshake is refused (see [`RedisStore`]).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// CA certificate(s) the server's certificate must chain to, instead of the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate and private key, for a server that asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// The files' contents as redis-rs takes them (`None` without any: the system's CAs), and
    /// all their bytes, to tell when they change.
    fn certificates(&self) -> Result<(Option<redis::TlsCertificates>, Vec<u8>)> {
        let read = |flag: &str, p: &Path| {
            std::fs::read(p)
                .map_err(|e| Error::Backend(format!("cannot read {flag} {}: {e}", p.display())))
        };
        if self.ca.is_none() && self.client.is_none() {
            return Ok((None, Vec::new()));
        }
        let root_cert = match &self.ca {
            Some(p) => Some(read("--store-ca-file", p)?),
            None => None,
        };
        let client_tls = match &self.client {
            Some((c, k)) => Some(redis::ClientTlsConfig {
                client_cert: read("--store-cert-file", c)?,
                client_key: read("--store-key-file", k)?,
            }),
            None => None,
        };
        let mut seen = root_cert.clone().unwrap_or_default();
        if let Some(c) = &client_tls {
            seen.extend_from_slice(&c.client_cert);
            seen.extend_from_slice(&c.client_key);
        }
        let certs = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        Ok((Some(certs), seen))
    }
}

impl RedisConfig {
    /// Defaults for a URL: upstream prefix, 2 s calls, 1 s connects.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: crate::keys::DEFAULT_PREFIX.into(),
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            tls: RedisTls::default(),
        }
    }

    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                format!("{}***{}", &self.url[..s + 3], &self.url[at..])
            }
            _ => self.url.clone(),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("key_prefix", &self.key_prefix)
            .field("op_timeout", &self.op_timeout)
            .field("tls_ca", &self.tls.ca.is_some())
            .field("tls_client_identity", &self.tls.client.is_some())
            .finish()
    }
}

// KEYS[4..] = the record's secondary indexes (scored by ARGV[5], its creation time).
const INSERT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[5], ARGV[2])
  end
  return 1
end
return 0";

const REPLACE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'XX') then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 1
end
return 0";

// KEYS[1], KEYS[2] = the expiry and last-activity indexes, KEYS[3..] = record keys; ARGV[1] =
// prefix .. 'idx:', ARGV[2..] = the ids. Each record goes with its index entries; the secondary
// index names are derived from the record's own fields, as `Keys::index` names them.
const DELETE: &str = r"
local n = 0
for i = 3, #KEYS do
  local id = ARGV[i - 1]
  local v = redis.call('GET', KEYS[i])
  n = n + redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if v then
    local ok, r = pcall(cjson.decode, v)
    if ok and type(r) == 'table' then
      local idx = ARGV[1]
      local kind = type(r.workloadKind) == 'string' and r.workloadKind or nil
      local by = type(r.createdBy) == 'string' and r.createdBy or nil
      if type(r.sandboxNamespace) == 'string' then
        redis.call('ZREM', idx .. 'ns:' .. r.sandboxNamespace, id)
      end
      if kind then redis.call('ZREM', idx .. 'kind:' .. kind, id) end
      if by then redis.call('ZREM', idx .. 'creator:' .. by, id) end
      if kind and by then redis.call('ZREM', idx .. 'kind-creator:' .. kind .. ':' .. by, id) end
      if type(r.ownerId) == 'string' then redis.call('ZREM', idx .. 'owner:' .. r.ownerId, id) end
    end
  end
end
return n";

// KEYS[1] = last-activity index, KEYS[2..] = record keys; ARGV = id, score pairs.
const TOUCH_MANY: &str = r"
local n = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('ZADD', KEYS[1], 'GT', ARGV[2 * i - 2], ARGV[2 * i - 3])
    n = n + 1
  end
end
return n";

// KEYS[1] = index to range over, KEYS[2..3] = both indexes; ARGV = max score, limit, key prefix,
// how many to skip. Index entries whose record vanished are dropped from both indexes and the
// page is read on in their place, so a page shorter than the limit is the end.
const LIST: &str = r"
local limit, skip = tonumber(ARGV[2]), tonumber(ARGV[4])
local out, n = {}, 0
repeat
  local hits = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', skip + n, limit - n)
  local dropped = 0
  for i = 1, #hits, 2 do
    local v = redis.call('GET', ARGV[3] .. hits[i])
    if v then
      out[#out + 1] = v
      out[#out + 1] = hits[i + 1]
      n = n + 1
    else
      redis.call('ZREM', KEYS[2], hits[i])
      redis.call('ZREM', KEYS[3], hits[i])
      dropped = dropped + 1
    end
  end
until dropped == 0 or n >= limit
return out";

// KEYS[1] = the scope's index; ARGV = cursor score, cursor id ('' for none), limit, prefix.
// Pages by rank after the cursor member; if that member is gone, after its (score, id) place.
// Returns id, score, record triples; entries whose record vanished are dropped from the index.
const PAGE: &str = r"
local start = 0
if ARGV[2] ~= '' then
  local r = redis.call('ZRANK', KEYS[1], ARGV[2])
  if r then
    start = r + 1
  else
    start = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])) do
      if m < ARGV[2] then start = start + 1 end
    end
  end
end
local hits = redis.call('ZRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #hits, 2 do
  local v = redis.call('GET', ARGV[4] .. hits[i])
  out[#out + 1] = hits[i]
  out[#out + 1] = hits[i + 1]
  out[#out + 1] = v or ''
  if not v then redis.call('ZREM', KEYS[1], hits[i]) end
end
return out";

struct Scripts {
    insert: Script,
    replace: Script,
    delete: Script,
    touch_many: Script,
    list: Script,
    page: Script,
}

/// The Redis/Valkey store.
pub struct RedisStore {
    /// The client, made again when a TLS handshake is refused and its files changed since.
    client: std::sync::Mutex<Client>,
    config: RedisConfig,
    keys: Keys,
    /// The shared connection, made on first use (with the client of that moment).
    conn: std::sync::RwLock<Option<ConnectionManager>>,
    /// Serializes making it.
    connecting: tokio::sync::Mutex<()>,
    scripts: Scripts,
}

/// A redis-rs client and the TLS files' bytes it was made with.
struct Client {
    redis: redis::Client,
    tls_files: Vec<u8>,
}

impl Client {
    fn new(config: &RedisConfig) -> Result<Self> {
        use redis::IntoConnectionInfo;
        let info = config.url.as_str().into_connection_info().map_err(|e| {
            Error::Backend(format!("invalid Redis URL {}: {e}", config.redacted_url()))
        })?;
        let info = info.set_tcp_settings(tcp_settings());
        let (certs, tls_files) = config.tls.certificates()?;
        let redis = match certs {
            None => redis::Client::open(info),
            Some(certs) => redis::Client::build_with_tls(info, certs),
        }
        .map_err(|e| Error::Backend(format!("Redis client: {e}")))?;
        Ok(Self { redis, tls_files })
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .finish()
    }
}

/// How long bytes sent to Redis may go unacknowledged by its host before the connection is
/// given up (`TCP_USER_TIMEOUT`). A command that times out does not make redis-rs reconnect, so
/// a connection whose packets stopped arriving (a node gone without a word, a load balancer that
/// dropped an idle flow) failed every command until the kernel gave up retransmitting, about 15
/// minutes. A slow or busy Redis still acknowledges what it is sent: only a dead path trips this,
/// or a Redis blocked for that long with our sends filling its socket buffer (Linux applies the
/// timeout to a shut receive window too), whose calls have timed out by then anyway.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(10);

/// Every store connection's TCP settings: no Nagle delay, keepalive probes after 30 s idle (an
/// idle connection that died is found before a command needs it, and the probes keep
/// middleboxes from forgetting it), and [`UNACKED_TIMEOUT`].
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(UNACKED_TIMEOUT)
}

/// A TLS handshake that failed either way (a certificate refused, or none given to a server
/// that asks): a configuration to fix, not an outage to wait out.
fn tls_refused(e: &RedisError) -> bool {
    use tokio_rustls::rustls;
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        // redis-rs keeps its sources behind an `Arc`; tokio-rustls's are `io::Error`s.
        let err = match err.downcast_ref::<Shared>() {
            Some(shared) => &**shared as &(dyn std::error::Error + 'static),
            None => err,
        };
        let io_inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if err.is::<rustls::Error>() || io_inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        next = err.source();
    }
    false
}

/// A Redis that cannot serve now (a connection that failed, a timeout, or an answer that says
/// to wait: `LOADING` its dataset after a restart, `MASTERDOWN`, `TRYAGAIN`, a write refused as
/// `READONLY` or `OOM`) is unavailable (`503`, retried later); any other error (a refused TLS
/// handshake, a wrong password included) is the backend's.
fn map_err(e: RedisError) -> Error {
    // `READONLY`: a primary demoted to replica (a failover its address has not followed yet);
    // `OOM`: full under `maxmemory` with `noeviction`, until keys go or an operator acts.
    let wait = matches!(e.retry_method(), redis::RetryMethod::WaitAndRetry)
        || matches!(e.code(), Some("READONLY" | "OOM"));
    if tls_refused(&e) {
        Error::Backend(format!("TLS: {e}"))
    } else if wait
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
    {
        Error::Unavailable(e.to_string())
    } else {
        Error::Backend(e.to_string())
    }
}

impl RedisStore {
    /// Validates the URL and reads the TLS files; does not connect yet.
    pub fn new(config: RedisConfig) -> Result<Self> {
        Ok(Self {
            client: std::sync::Mutex::new(Client::new(&config)?),
            keys: Keys::new(&config.key_prefix),
            config,
            conn: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            scripts: Scripts {
                insert: Script::new(INSERT),
                replace: Script::new(REPLACE),
                delete: Script::new(DELETE),
                touch_many: Script::new(TOUCH_MANY),
                list: Script::new(LIST),
                page: Script::new(PAGE),
            },
        })
    }

    /// The shared multiplexed connection, made on first use (and retried on later calls if the
    /// first attempt failed). After that, redis-rs reconnects it by itself.
    async fn conn(&self) -> Result<ConnectionManager> {
        if let Some(c) = self.conn.read().unwrap().as_ref() {
            return Ok(c.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.read().unwrap().as_ref() {
            return Ok(c.clone());
        }
        let timeout = self.config.connect_timeout;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(self.config.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let client = self.client.lock().unwrap().redis.clone();
        let result = ConnectionManager::new_with_config(client, cfg).await;
        let conn = result.map_err(|e| self.failed(e))?;
        *self.conn.write().unwrap() = Some(conn.clone());
        Ok(conn)
    }

    /// Maps `e`; a refused TLS handshake first reads the TLS files again: when they changed (a
    /// renewed client certificate, a new CA), the next call connects with them. redis-rs
    /// reconnects with the files it was made with, so an expired client certificate was
    /// refused until a restart.
    fn failed(&self, e: RedisError) -> Error {
        if tls_refused(&e) && (self.config.tls.ca.is_some() || self.config.tls.client.is_some()) {
            match Client::new(&self.config) {
                Ok(fresh) => {
                    let mut client = self.client.lock().unwrap();
                    if fresh.tls_files != client.tls_files {
                        tracing::info!("the store's TLS files changed: connecting with them");
                        *client = fresh;
                        *self.conn.write().unwrap() = None;
                    }
                }
                Err(read) => tracing::warn!(error = %read, "cannot read the store's TLS files"),
            }
        }
        map_err(e)
    }

    /// Runs `work` on a connection, bounded by the operation timeout; `what` names it then.
    async fn bounded<T, F, Fut>(&self, what: &str, work: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let run = async { work(self.conn().await?).await.map_err(|e| self.failed(e)) };
        tokio::time::timeout(self.config.op_timeout, run)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "{what}: no answer within {:?}",
                    self.config.op_timeout
                ))
            })?
    }

    /// Runs one script invocation.
    async fn call<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T> {
        let work = |mut c: ConnectionManager| async move { inv.invoke_async(&mut c).await };
        self.bounded("script", work).await
    }

    /// Runs one command; `what` names it in a timeout.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let work = |mut c: ConnectionManager| async move { cmd.query_async(&mut c).await };
        self.bounded(what, work).await
    }

    /// [`RedisStore::query`] for a pipeline.
    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<T> {
        let work = |mut c: ConnectionManager| async move { pipe.query_async(&mut c).await };
        self.bounded(what, work).await
    }

    async fn list(
        &self,
        index: &str,
        before: Timestamp,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<(SessionRecord, i64)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.scripts.list.prepare_invoke();
        inv.key(index)
            .key(self.keys.expiry())
            .key(self.keys.last_activity())
            .arg(score(before))
            .arg(limit)
            .arg(self.keys.prefix())
            .arg(skip);
        let flat: Vec<String> = self.call(inv).await?;
        flat.chunks_exact(2)
            .map(|pair| {
                let record: SessionRecord = serde_json::from_str(&pair[0])?;
                let s = pair[1]
                    .parse::<f64>()
                    .map_err(|e| Error::Backend(format!("bad score {:?}: {e}", pair[1])))?;
                Ok((record, s as i64))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    async fn ping(&self) -> Result<()> {
        self.query::<String>(&redis::cmd("PING"), "PING").await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<SessionRecord> {
        if check_id(id).is_err() {
            return Err(Error::NotFound);
        }
        let key = self.keys.record(id);
        let json: Option<String> = self.query(redis::cmd("GET").arg(&key), "GET").await?;
        Ok(serde_json::from_str(&json.ok_or(Error::NotFound)?)?)
    }

    async fn exists_many(&self, ids: &[String]) -> Result<Vec<bool>> {
        let valid: Vec<&String> = ids.iter().filter(|id| check_id(id).is_ok()).collect();
        let mut pipe = redis::pipe();
        for id in &valid {
            pipe.cmd("EXISTS").arg(self.keys.record(id));
        }
        let found: Vec<bool> = match valid.is_empty() {
            true => Vec::new(),
            false => self.query_pipe(&pipe, "EXISTS").await?,
        };
        let mut found = found.into_iter();
        Ok(ids
            .iter()
            .map(|id| check_id(id).is_ok() && found.next().unwrap_or(false))
            .collect())
    }

    async fn insert(&self, record: &SessionRecord, now: Timestamp) -> Result<()> {
        let id = &record.session_id;
        check_id(id)?;
        let json = serde_json::to_string(record)?;
        let mut inv = self.scripts.insert.prepare_invoke();
        inv.key(self.keys.record(id))
            .key(self.keys.expiry())
            .key(self.keys.last_activity());
        for scope in Scope::of(record) {
            inv.key(self.keys.index(&scope));
        }
        inv.arg(json)
            .arg(id)
            .arg(score(record.expires_at))
            .arg(score(now))
            .arg(score(record.created_at));
        match self.call::<i64>(inv).await? {
            1 => Ok(()),
            _ => Err(Error::AlreadyExists),
        }
    }

    async fn replace(&self, record: &SessionRecord) -> Result<()> {
        let id = &record.session_id;
        check_id(id)?;
        let json = serde_json::to_string(record)?;
        let mut inv = self.scripts.replace.prepare_invoke();
        inv.key(self.keys.record(id))
            .key(self.keys.expiry())
            .arg(json)
            .arg(id)
            .arg(score(record.expires_at));
        match self.call::<i64>(inv).await? {
            1 => Ok(()),
            _ => Err(Error::NotFound),
        }
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        Ok(self.delete_many(&[id.to_string()]).await? > 0)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<usize> {
        let valid: Vec<&String> = ids.iter().filter(|id| check_id(id).is_ok()).collect();
        if valid.is_empty() {
            return Ok(0);
        }
        let mut inv = self.scripts.delete.prepare_invoke();
        inv.key(self.keys.expiry())
            .key(self.keys.last_activity())
            .arg(format!("{}{}", self.keys.prefix(), crate::keys::INDEX));
        for id in valid {
            inv.key(self.keys.record(id)).arg(id.as_str());
        }
        Ok(self.call::<i64>(inv).await?.max(0) as usize)
    }

    async fn touch(&self, id: &str, at: Timestamp) -> Result<()> {
        match self.touch_many(&[(id.to_string(), at)]).await? {
            0 => Err(Error::NotFound),
            _ => Ok(()),
        }
    }

    async fn touch_many(&self, touches: &[(String, Timestamp)]) -> Result<usize> {
        let valid: Vec<_> = touches
            .iter()
            .filter(|(id, _)| check_id(id).is_ok())
            .collect();
        if valid.is_empty() {
            return Ok(0);
        }
        let mut inv = self.scripts.touch_many.prepare_invoke();
        inv.key(self.keys.last_activity());
        for (id, at) in &valid {
            inv.key(self.keys.record(id))
                .arg(id.as_str())
                .arg(score(*at));
        }
        Ok(self.call::<i64>(inv).await?.max(0) as usize)
    }

    async fn list_expired(&self, before: Timestamp, limit: usize) -> Result<Vec<SessionRecord>> {
        let hits = self.list(self.keys.expiry(), before, 0, limit).await?;
        Ok(hits.into_iter().map(|(r, _)| r).collect())
    }

    async fn list_idle(
        &self,
        before: Timestamp,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<IdleSession>> {
        let hits = self
            .list(self.keys.last_activity(), before, skip, limit)
            .await?;
        crate::idle_sessions(hits)
    }

    async fn count(&self, scope: &Scope) -> Result<usize> {
        let key = self.keys.index(scope);
        self.query(redis::cmd("ZCARD").arg(&key), "ZCARD").await
    }

    async fn list_page(&self, scope: &Scope, cursor: Option<&str>, limit: usize) -> Result<Page> {
        let (cs, cid) = match cursor {
            Some(c) => {
                let (s, id) = parse_cursor(c)?;
                (s, id.to_string())
            }
            None => (0, String::new()),
        };
        if limit == 0 {
            return Ok(Page {
                records: Vec::new(),
                next: None,
            });
        }
        let mut inv = self.scripts.page.prepare_invoke();
        inv.key(self.keys.index(scope))
            .arg(cs)
            .arg(cid)
            .arg(limit)
            .arg(self.keys.prefix());
        let flat: Vec<String> = self.call(inv).await?;
        let mut records = Vec::new();
        let mut last = None;
        for t in flat.chunks_exact(3) {
            let s = t[1]
                .parse::<f64>()
                .map_err(|e| Error::Backend(format!("bad score {:?}: {e}", t[1])))?;
            last = Some(cursor_of(s as i64, &t[0]));
            if !t[2].is_empty() {
                records.push(serde_json::from_str(&t[2])?);
            }
        }
        let next = if flat.len() / 3 == limit { last } else { None };
        Ok(Page { records, next })
    }

    async fn set_mark(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keys.mark(name))
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        if only_if_absent {
            cmd.arg("NX");
        }
        let set: Option<String> = self.query(&cmd, "SET").await?;
        Ok(set.is_some())
    }

    async fn get_marks(&self, names: &[String]) -> Result<Vec<Option<String>>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for n in names {
            cmd.arg(self.keys.mark(n));
        }
        self.query(&cmd, "MGET").await
    }
}
