//! The client → Workload Manager boundary on the real API server: names that cannot be names,
//! floods of made-up definitions and tokens, callers' tokens, RBAC and ownership.

use super::*;

#[tokio::test]
async fn a_namespace_or_name_that_is_not_one_never_reaches_the_api_server() {
    // kube-rs puts names into request paths as they are: a definition the Workload Manager has
    // not seen yet was fetched with the client's namespace and name, so `/`, `?` and `..` chose
    // what the Workload Manager asked the API server with its own credentials, and every variant
    // that answered with a definition stayed in its cache for ever.
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        ..Default::default()
    })
    .await;
    let before = cluster().audit_events().len();
    for (namespace, name) in [
        ("default", "od/status"),
        ("default", "od?x=1"),
        ("default/codeinterpreters/od?x=", "y"),
        ("default/../default", "od"),
        ("Default", "od"),
        ("default", "OD"),
        ("default", &"o".repeat(254)),
    ] {
        let (status, body) =
            common::create_session_in(&k.http, &k.url, "code-interpreter", namespace, name).await;
        let message = body["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{namespace}/{name}: {body}");
        assert!(
            message.starts_with("code interpreter not found: ")
                && message.contains("Invalid value")
                && message.contains("RFC 1123"),
            "{namespace}/{name}: {message}"
        );
    }
    // Reads only: the controller patches the real `od`'s status whenever it gets to it (CI once
    // saw that patch land here).
    let asked: Vec<String> = cluster().audit_events()[before..]
        .iter()
        .filter(|e| e["verb"] == "get")
        .filter_map(|e| e["requestURI"].as_str().map(str::to_string))
        .filter(|uri| uri.contains("codeinterpreters/"))
        .collect();
    assert!(asked.is_empty(), "the API server was asked: {asked:?}");
    // A session record (whoever can write the store wrote it) naming such a "Sandbox": its
    // delete asks the API server nothing and removes the record.
    let before = cluster().audit_events().len();
    let now = jiff::Timestamp::now();
    let record = agentcube_types::SessionRecord::placeholder(
        "planted",
        "default/../../../api/v1/namespaces/default",
        "pods?x=",
        now,
        now + jiff::SignedDuration::from_hours(1),
        agentcube_types::GoDuration(Duration::from_secs(900)),
    );
    k.store.insert(&record, now).await.unwrap();
    assert_eq!(k.delete("planted").await, 200);
    assert!(k.store.get("planted").await.is_err(), "record removed");
    let asked: Vec<String> = cluster().audit_events()[before..]
        .iter()
        .filter_map(|e| e["requestURI"].as_str().map(str::to_string))
        .filter(|uri| uri.contains("x="))
        .collect();
    assert!(asked.is_empty(), "the API server was asked: {asked:?}");
    // The real one still works.
    k.create_ok("code-interpreter", "od").await;
}

#[tokio::test]
async fn a_flood_of_unknown_definitions_asks_the_api_server_a_bounded_number_of_times() {
    // A definition the watch has not delivered is fetched from the API server (a CR applied a
    // moment ago), and names nobody defined are free to make up: unbounded, every request for
    // one was a GET at the API server, from any client (authentication is off by default).
    let k = KubeStack::start(KubeOptions::default()).await;
    let before = cluster().audit_events().len();
    let started = std::time::Instant::now();
    let creates = (0..200).map(|i| {
        let (http, url) = (k.http.clone(), k.url.clone());
        async move {
            common::create_session(&http, &url, "code-interpreter", &format!("nope-{i}"))
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(creates).await;
    assert!(statuses.iter().all(|s| *s == 404), "{statuses:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let gets = cluster().audit_events()[before..]
        .iter()
        .filter(|e| e["objectRef"]["resource"] == "codeinterpreters" && e["verb"] == "get")
        .count();
    assert!(
        gets as f64 <= 20.0 + 10.0 * elapsed,
        "{gets} GETs in {elapsed:.1} s for 200 unknown names"
    );
    // Once the flood is over, a CR applied a moment ago is still found straight away (asked
    // for, or delivered by the watch).
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(&k.client, ON_DEMAND).await;
    k.create_ok("code-interpreter", "od").await;
}

/// A service account's token from the API server (TokenRequest), creating the account (and its
/// namespace) first.
async fn sa_token(client: &kube::Client, ns: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use kube::api::PostParams;
    let pp = PostParams::default();
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let _ = sas
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await;
    let req: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let done = sas.create_token_request(name, &pp, &req).await.unwrap();
    done.status.unwrap().token
}

/// Reviews of `resource` (`tokenreviews`, `subjectaccessreviews`) the API server was asked to
/// create since the stack started.
fn reviews_asked(k: &KubeStack, resource: &str) -> usize {
    cluster()
        .audit_events()
        .iter()
        .skip(k.audit_start)
        .filter(|e| e["objectRef"]["resource"] == resource && e["verb"] == "create")
        .count()
}

/// 1,500 creates of `od`, 64 at a time, the i-th with `token(i)` in `namespace(i)`; then checks
/// that each was `refusal` or 503 and that the API server was asked for at most the budget of
/// `resource` reviews (500 at once, then 100 a second), some of them having been turned away.
async fn flood_of_made_up(
    k: &KubeStack,
    token: impl Fn(usize) -> String,
    namespace: impl Fn(usize) -> String,
    refusal: u16,
    resource: &str,
) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let calls = (0..1500).map(|i| {
        let request = http
            .post(format!("{}/v1/code-interpreter", k.url))
            .bearer_auth(token(i))
            .json(&json!({"name": "od", "namespace": namespace(i)}));
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::stream::iter(calls)
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let (refused, busy) = (
        statuses.iter().filter(|s| **s == refusal).count(),
        statuses.iter().filter(|s| **s == 503).count(),
    );
    assert_eq!(
        refused + busy,
        1500,
        "only {refusal}s and 503s: {statuses:?}"
    );
    let asked = reviews_asked(k, resource);
    assert!(
        asked as f64 <= 500.0 + 100.0 * elapsed + 2.0 && busy > 0,
        "{asked} {resource}, {busy} answered 503, in {elapsed:.1} s"
    );
}

#[tokio::test]
async fn made_up_tokens_are_reviewed_at_a_bounded_rate() {
    // Each token not seen before is a TokenReview at the API server, and made-up tokens cost a
    // client nothing: unbounded, one unauthenticated client had the Workload Manager send one
    // per request.
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        auth_admin_group: Some("system:serviceaccounts:agentcube-admins".into()),
        ..Default::default()
    })
    .await;
    let made_up = |i| format!("eyJhbGciOiJSUzI1NiJ9.e30.made-up-{i}");
    flood_of_made_up(&k, made_up, |_| "default".into(), 401, "tokenreviews").await;
    // A real caller is still reviewed once the flood is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let root = sa_token(&k.client, "agentcube-admins", "root").await;
    let r = k
        .http
        .get(format!("{}/v1/code-interpreter/sessions", k.url))
        .bearer_auth(&root)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn made_up_namespaces_are_access_checked_at_a_bounded_rate() {
    // Each caller × namespace not asked about before is a SubjectAccessReview, and namespaces
    // cost an authenticated caller nothing to make up (one it may not create in gets a 403
    // whether the definition exists or not, so the check comes before the 404).
    let k = KubeStack::start(KubeOptions {
        manifests: ON_DEMAND.into(),
        auth_admin_group: Some("system:serviceaccounts:agentcube-admins".into()),
        ..Default::default()
    })
    .await;
    let bob = sa_token(&k.client, "default", "bob").await;
    let made_up = |i| format!("made-up-{i}");
    flood_of_made_up(&k, |_| bob.clone(), made_up, 403, "subjectaccessreviews").await;
    assert_eq!(
        k.store.count(&agentcube_store::Scope::All).await.unwrap(),
        0
    );
}

/// A Role letting service account `ns/sa` create Sandboxes in `ns`, bound to it.
async fn grant_sandbox_creates(client: &kube::Client, ns: &str, sa: &str) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let pp = kube::api::PostParams::default();
    let role = serde_json::from_value(json!({"metadata": {"name": "sandbox-creator"},
        "rules": [{"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes"], "verbs": ["create"]}]}))
    .unwrap();
    let _ = Api::<Role>::namespaced(client.clone(), ns)
        .create(&pp, &role)
        .await;
    let binding = serde_json::from_value(json!({"metadata": {"name": format!("sandbox-creator-{sa}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sandbox-creator"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}))
    .unwrap();
    let _ = Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&pp, &binding)
        .await;
    // The API server's authorizer follows RBAC objects through a watch: wait until it allows.
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    let review: SubjectAccessReview = serde_json::from_value(json!({"spec": {
        "user": format!("system:serviceaccount:{ns}:{sa}"),
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")],
        "resourceAttributes": {"namespace": ns, "verb": "create", "group": "agents.x-k8s.io",
            "resource": "sandboxes"}}}))
    .unwrap();
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    for _ in 0..100 {
        let done = reviews.create(&pp, &review).await.unwrap();
        if done.status.is_some_and(|s| s.allowed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("RBAC for {ns}/{sa} never took effect");
}

#[tokio::test]
async fn callers_are_reviewed_and_see_and_delete_only_their_own_sessions() {
    let k = KubeStack::start(KubeOptions {
        manifests: format!("{ON_DEMAND}---\n{POOLED}"),
        auth_admin_group: Some("system:serviceaccounts:agentcube-admins".into()),
        auth_trusted_callers: vec!["system:serviceaccount:agentcube:router".into()],
        ..Default::default()
    })
    .await;
    let alice = sa_token(&k.client, "default", "alice").await;
    let bob = sa_token(&k.client, "default", "bob").await;
    let root = sa_token(&k.client, "agentcube-admins", "root").await;
    let call = |method: reqwest::Method, path: String, token: Option<&str>| {
        let mut r = k.http.request(method, format!("{}{path}", k.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let r = r
                .json(&json!({"name": "od", "namespace": "default"}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    use reqwest::Method;
    let create = "/v1/code-interpreter".to_string();
    // Without a valid service-account token nothing is created.
    let message = |v: serde_json::Value| v["message"].as_str().unwrap_or_default().to_string();
    let (st, v) = call(Method::POST, create.clone(), None).await;
    assert_eq!(
        (st, message(v)),
        (401, "Missing authorization header".into())
    );
    let (st, v) = call(Method::POST, create.clone(), Some("not-a-token")).await;
    assert_eq!((st, message(v)), (401, "Invalid or expired token".into()));
    assert_eq!(
        k.store.count(&agentcube_store::Scope::All).await.unwrap(),
        0
    );

    // Bob may not create Sandboxes in `default` (upstream would have made the Sandbox with his
    // token, and RBAC refused it): 403 naming what he lacks, asked once however often he tries.
    // He may create nothing there, so a definition that does not exist is the same 403: he
    // cannot find out which are defined.
    let lacks = "system:serviceaccount:default:bob may not create sessions in namespace default: \
                 a session is a sandboxes.agents.x-k8s.io there (from a warm pool, a \
                 sandboxclaims.extensions.agents.x-k8s.io)";
    for name in ["od", "od", "pooled", "not-defined"] {
        let r = k
            .http
            .post(format!("{}{create}", k.url))
            .bearer_auth(&bob)
            .json(&json!({"name": name, "namespace": "default"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{name}");
        let said = message(r.json().await.unwrap());
        assert!(said.starts_with(lacks), "{name}: {said}");
    }
    assert_eq!(
        k.store.count(&agentcube_store::Scope::All).await.unwrap(),
        0
    );
    // Alice may (a Role in `default`); root is an administrator and needs none.
    let access_reviews = || reviews_asked(&k, "subjectaccessreviews");
    let before_grant = access_reviews();
    grant_sandbox_creates(&k.client, "default", "alice").await;
    let the_tests_own = access_reviews() - before_grant;
    let (st, v) = call(Method::POST, create.clone(), Some(&alice)).await;
    assert_eq!(st, 200, "{v}");
    let sid = v["sessionId"].as_str().unwrap().to_string();
    // A session of a warm pool is a SandboxClaim, which her Role does not grant.
    let pooled = k
        .http
        .post(format!("{}{create}", k.url))
        .bearer_auth(&alice)
        .json(&json!({"name": "pooled", "namespace": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(pooled.status().as_u16(), 403);
    // She may create Sandboxes there: what is not defined is a 404 to her.
    let undefined = k
        .http
        .post(format!("{}{create}", k.url))
        .bearer_auth(&alice)
        .json(&json!({"name": "not-defined", "namespace": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(undefined.status().as_u16(), 404);
    let refused = message(pooled.json().await.unwrap());
    assert!(
        refused.contains("may not create sandboxclaims.extensions.agents.x-k8s.io"),
        "{refused}"
    );
    // (Its warm pool goes with it: the test ends with no pod left.)
    code_interpreters(&k.client)
        .delete("pooled", &DeleteParams::default())
        .await
        .unwrap();
    let (st, v) = call(Method::POST, create.clone(), Some(&root)).await;
    assert_eq!(st, 200, "{v}");
    // The Router (a trusted caller) creates anywhere without RBAC for it, but is no
    // administrator: alice's session stays hidden from it.
    let router = sa_token(&k.client, "agentcube", "router").await;
    let (st, routed) = call(Method::POST, create.clone(), Some(&router)).await;
    assert_eq!(st, 200, "{routed}");
    let alices = format!("/v1/code-interpreter/sessions/{sid}");
    assert_eq!(call(Method::GET, alices, Some(&router)).await.0, 404);
    let routed = format!(
        "/v1/code-interpreter/sessions/{}",
        routed["sessionId"].as_str().unwrap()
    );
    assert_eq!(call(Method::DELETE, routed, Some(&router)).await.0, 200);
    assert_eq!(
        call(
            Method::DELETE,
            format!(
                "/v1/code-interpreter/sessions/{}",
                v["sessionId"].as_str().unwrap()
            ),
            Some(&root)
        )
        .await
        .0,
        200
    );
    let rec = k.store.get(&sid).await.unwrap();
    assert_eq!(
        rec.created_by.as_deref(),
        Some("system:serviceaccount:default:alice")
    );
    let one = format!("/v1/code-interpreter/sessions/{sid}");
    let list = "/v1/code-interpreter/sessions".to_string();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["sessionId"].as_str().unwrap().to_string())
            .collect()
    };
    // Bob cannot see, find or delete it: 404, as if it did not exist.
    assert_eq!(call(Method::GET, one.clone(), Some(&bob)).await.0, 404);
    assert!(ids(&call(Method::GET, list.clone(), Some(&bob)).await.1).is_empty());
    assert_eq!(call(Method::DELETE, one.clone(), Some(&bob)).await.0, 404);
    assert!(k.store.get(&sid).await.is_ok(), "still there");
    // Its creator and an administrator can.
    assert_eq!(call(Method::GET, one.clone(), Some(&alice)).await.0, 200);
    assert_eq!(
        ids(&call(Method::GET, list.clone(), Some(&alice)).await.1),
        std::slice::from_ref(&sid)
    );
    assert_eq!(
        ids(&call(Method::GET, list.clone(), Some(&root)).await.1),
        std::slice::from_ref(&sid)
    );
    assert_eq!(call(Method::GET, one.clone(), Some(&root)).await.0, 200);
    // Answers are cached: one TokenReview per token however many calls.
    let reviews = reviews_asked(&k, "tokenreviews");
    assert_eq!(
        reviews, 5,
        "alice, bob, root, the router and the refused token, once each"
    );
    assert_eq!(
        access_reviews() - the_tests_own,
        4,
        "bob and alice (Sandboxes and SandboxClaims) once each, none for the administrator"
    );
    assert_eq!(call(Method::DELETE, one.clone(), Some(&alice)).await.0, 200);
    assert!(k.store.get(&sid).await.is_err());
    assert_eq!(k.stop().await, 0, "no pod process left");
}
