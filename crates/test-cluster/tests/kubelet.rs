//! The process kubelet as pods see it, on the shared test cluster: startup and liveness probes restart a
//! container, a crashed one is reported as a kubelet does, and Service names resolve to a ready
//! pod through `/etc/hosts`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

async fn client() -> kube::Client {
    let bin = agentcube_test_cluster::debug_bin_dir();
    agentcube_test_cluster::shared(&bin).client().await
}

async fn namespace(c: &kube::Client, name: &str) -> Api<Pod> {
    let ns = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    // The controller-manager gives a new namespace its `default` service account shortly after.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.clone(), name);
    until("service account default", 30, async || {
        sas.get_opt("default").await.unwrap().map(|_| ())
    })
    .await;
    Api::namespaced(c.clone(), name)
}

fn python_pod(name: &str, labels: Value, script: &str, probes: Value) -> Pod {
    let mut container = json!({
        "name": "main", "image": "python:3.12-slim", "command": ["python3", "-c", script],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    });
    for (k, v) in probes.as_object().unwrap() {
        container[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [container], "automountServiceAccountToken": false}
    }))
    .unwrap()
}

async fn until<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

const SERVE: &str = "import http.server as h, os\nh.HTTPServer((os.environ['POD_IP'], 8000), h.SimpleHTTPRequestHandler).serve_forever()";

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_container_and_a_passing_one_does_not() {
    let c = client().await;
    let pods = namespace(&c, "liveness").await;
    let probe = |port: u16| json!({"livenessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 2}});
    for (name, port) in [("dead", 9), ("alive", 8000)] {
        let pod = python_pod(name, json!({"app": name}), SERVE, probe(port));
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    until("the dead pod restarted", 30, async || {
        (restarts(&pods.get("dead").await.unwrap()) >= 1).then_some(())
    })
    .await;
    let alive = pods.get("alive").await.unwrap();
    assert!(ready(&alive), "{:?}", alive.status);
    assert_eq!(
        restarts(&alive),
        0,
        "a container that answers its probe keeps running"
    );
}

/// A container slow to start is given its startup probe's time: liveness (which would restart
/// it at its first failure) and readiness wait for the startup probe; a startup probe that
/// never passes restarts the container.
#[tokio::test]
async fn a_startup_probe_holds_liveness_and_readiness_back_until_it_passes() {
    let c = client().await;
    let pods = namespace(&c, "startup").await;
    let slow = format!("import time\ntime.sleep(4)\n{SERVE}");
    let tcp = json!({"tcpSocket": {"port": 8000}, "periodSeconds": 1, "failureThreshold": 1});
    let probes = |startup_port: u16| {
        json!({
            "startupProbe": {"tcpSocket": {"port": startup_port}, "periodSeconds": 1, "failureThreshold": 8},
            "livenessProbe": tcp, "readinessProbe": tcp,
        })
    };
    for (name, port) in [("slow", 8000), ("never", 9)] {
        let pod = python_pod(name, json!({"app": name}), &slow, probes(port));
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let starting = pods.get("slow").await.unwrap();
    assert!(!ready(&starting), "Ready before it serves");
    until("the slow pod Ready", 30, async || {
        ready(&pods.get("slow").await.unwrap()).then_some(())
    })
    .await;
    until("the never-starting pod restarted", 30, async || {
        (restarts(&pods.get("never").await.unwrap()) >= 1).then_some(())
    })
    .await;
    let slow = pods.get("slow").await.unwrap();
    assert_eq!(
        restarts(&slow),
        0,
        "restarted while starting: {:?}",
        slow.status
    );
}

#[tokio::test]
async fn a_container_that_exits_is_in_crash_loop_back_off_with_its_exit_as_last_state() {
    let c = client().await;
    let pods = namespace(&c, "crash").await;
    let pod = python_pod("crash", json!({}), "raise SystemExit(3)", json!({}));
    pods.create(&PostParams::default(), &pod).await.unwrap();
    // As a kubelet reports it between restarts: waiting in back-off, the exit in `lastState`.
    let status = until("the crash reported", 30, async || {
        let p = pods.get("crash").await.unwrap();
        let s = p.status?.container_statuses?.into_iter().next()?;
        let waiting = s.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
        (waiting == "CrashLoopBackOff").then_some(s)
    })
    .await;
    let last = status.last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    let finished = last.finished_at.expect("finishedAt").0;
    assert!(jiff::Timestamp::now().duration_since(finished).as_secs() < 60);
    assert!(!status.ready);
}

#[tokio::test]
async fn a_service_name_resolves_to_a_ready_pod_behind_it() {
    let c = client().await;
    let pods = namespace(&c, "names").await;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 8000, "targetPort": 8000}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(c.clone(), "names")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let readiness = json!({"readinessProbe": {"tcpSocket": {"port": 8000}}});
    // The client becomes Ready only after fetching from the Service by its cluster name.
    let client_script = "import os, time, urllib.request, http.server as h\nwhile True:\n    try:\n        urllib.request.urlopen('http://web.names.svc.cluster.local:8000/', timeout=1).read()\n        break\n    except Exception:\n        time.sleep(0.2)\nh.HTTPServer((os.environ['POD_IP'], 8000), h.SimpleHTTPRequestHandler).serve_forever()";
    pods.create(
        &PostParams::default(),
        &python_pod(
            "client",
            json!({"app": "client"}),
            client_script,
            readiness.clone(),
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !ready(&pods.get("client").await.unwrap()),
        "no ready pod behind the Service yet: the name must not resolve"
    );
    pods.create(
        &PostParams::default(),
        &python_pod("web", json!({"app": "web"}), SERVE, readiness),
    )
    .await
    .unwrap();
    until(
        "the client reached web.names.svc.cluster.local",
        30,
        async || ready(&pods.get("client").await.unwrap()).then_some(()),
    )
    .await;
}

/// A deleted pod's program gets SIGTERM as PID 1 of its namespace, as from a container runtime,
/// and ends within its grace period; one without a handler ignores it (PID 1 does) and is
/// killed when the grace period is over.
#[tokio::test]
async fn a_deleted_pod_gets_sigterm_as_pid_1_and_sigkill_after_its_grace_period() {
    use kube::api::DeleteParams;
    use tokio::io::AsyncReadExt;
    let c = client().await;
    let pods = namespace(&c, "grace").await;
    // Pods share the host's network stack: they can call the test back on loopback.
    let told = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = told.local_addr().unwrap().port();
    // Ready once listening, which each does only after its signal handling is in place (a
    // SIGTERM before Python installs its handler would be ignored, as by any PID 1).
    let serve = "l = socket.create_server((os.environ['POD_IP'], 8000))\nwhile True:\n    l.accept()[0].close()";
    let handled = format!(
        "import os, signal, socket\ndef term(n, f):\n    socket.create_connection(('127.0.0.1', {port})).sendall(b'SIGTERM as pid %d' % os.getpid())\n    raise SystemExit(0)\nsignal.signal(signal.SIGTERM, term)\n{serve}"
    );
    let ignored = format!("import os, socket\n{serve}");
    let readiness = json!({"readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1}});
    for (name, script) in [("handled", &handled), ("ignored", &ignored)] {
        pods.create(
            &PostParams::default(),
            &python_pod(name, json!({}), script, readiness.clone()),
        )
        .await
        .unwrap();
    }
    for name in ["handled", "ignored"] {
        until("the pod running", 30, async || {
            ready(&pods.get(name).await.unwrap()).then_some(())
        })
        .await;
    }
    let grace = 6;
    let gone = async |name: &str| {
        let started = tokio::time::Instant::now();
        pods.delete(name, &DeleteParams::default().grace_period(grace))
            .await
            .unwrap();
        until("the pod gone", 30, async || {
            pods.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
        started.elapsed()
    };
    let took = gone("handled").await;
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), told.accept())
        .await
        .expect("the program was not told")
        .unwrap();
    let mut said = String::new();
    s.read_to_string(&mut said).await.unwrap();
    assert_eq!(said, "SIGTERM as pid 1");
    assert!(took < Duration::from_secs(grace as u64), "{took:?}");
    let took = gone("ignored").await;
    assert!(took >= Duration::from_secs(grace as u64), "{took:?}");
}
