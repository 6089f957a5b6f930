use super::*;

const YAML: &str =
    "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"dns://decode.test:8200\"]\n";

fn setup() -> (Config, Discovery, Topology) {
    let cfg = Config::from_yaml(YAML).unwrap();
    let d = Discovery::new(&cfg, Arc::new(|_| {}));
    let topo = Topology::from_config(&cfg);
    (cfg, d, topo)
}

/// Feeds one answer for the (only) name, as the resolver thread would.
fn answer(d: &mut Discovery, topo: &Topology, a: Answer) -> Changes {
    let target = d.followed[0].stats.target.clone();
    d.followed[0].pending = true;
    d.apply(
        Resolved {
            answers: vec![(target, a)],
        },
        topo,
    )
}

fn found(ips: &[&str]) -> Answer {
    Answer::Found(
        ips.iter().map(|i| i.parse().unwrap()).collect(),
        Duration::from_secs(30),
    )
}

fn addrs(list: &[Arc<Instance>]) -> Vec<String> {
    list.iter().map(|i| i.address.clone()).collect()
}

#[test]
fn answers_become_instances_and_failures_keep_the_last_set() {
    let (_, mut d, topo) = setup();
    assert_eq!(d.next_due().map(|t| t <= Instant::now()), Some(true));
    let c = answer(&mut d, &topo, found(&["10.0.0.2", "10.0.0.3"]));
    assert_eq!(addrs(&c.added), ["10.0.0.2:8200", "10.0.0.3:8200"]);
    assert!(c
        .added
        .iter()
        .all(|i| i.role == Role::Decode && &*i.model == "m"));
    let topo = topo.with_changes(&c.added, &c.removed);
    assert_eq!(topo.instances().count(), 3);

    // Failed and empty answers change nothing and mark the set stale.
    for a in [Answer::Failed("timeout".into()), Answer::Empty] {
        let c = answer(&mut d, &topo, a);
        assert!(c.is_empty());
        assert!(d.followed[0].stats.stale.load(Ordering::Relaxed));
    }
    assert_eq!(d.followed[0].stats.failed.load(Ordering::Relaxed), 1);
    assert_eq!(d.followed[0].stats.empty.load(Ordering::Relaxed), 1);

    // A changed answer: one joins, one leaves.
    let c = answer(&mut d, &topo, found(&["10.0.0.3", "10.0.0.4"]));
    assert!(!d.followed[0].stats.stale.load(Ordering::Relaxed));
    assert_eq!(addrs(&c.added), ["10.0.0.4:8200"]);
    assert_eq!(addrs(&c.removed), ["10.0.0.2:8200"]);
    let topo = topo.with_changes(&c.added, &c.removed);
    let mut now: Vec<String> = topo.instances().map(|i| i.address.clone()).collect();
    now.sort();
    assert_eq!(now, ["10.0.0.3:8200", "10.0.0.4:8200", "127.0.0.1:8100"]);
    // The same answer again changes nothing.
    assert!(answer(&mut d, &topo, found(&["10.0.0.3", "10.0.0.4"])).is_empty());
}

#[test]
fn configured_addresses_are_left_alone() {
    let cfg = Config::from_yaml(
        "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"10.0.0.7:8200\", \"dns://decode.test:8200\"]\n",
    )
    .unwrap();
    let mut d = Discovery::new(&cfg, Arc::new(|_| {}));
    let topo = Topology::from_config(&cfg);
    // The fixed entry's address shows up in the answer: it is not taken twice.
    let c = answer(&mut d, &topo, found(&["10.0.0.7", "10.0.0.2"]));
    assert_eq!(addrs(&c.added), ["10.0.0.2:8200"]);
    let topo = topo.with_changes(&c.added, &c.removed);
    // Nor is an address an operator added through the admin API.
    let admin = Arc::new(Instance::new(
        "10.0.0.9:8200".into(),
        "10.0.0.9:8200".parse().unwrap(),
        Role::Decode,
        Arc::from("m"),
    ));
    let topo = topo.with_changes(&[admin], &[]);
    let c = answer(&mut d, &topo, found(&["10.0.0.2", "10.0.0.7", "10.0.0.9"]));
    assert!(c.is_empty());
    assert_eq!(d.followed[0].stats.addresses.load(Ordering::Relaxed), 1);
    // When the name drops them all, only its own instance leaves.
    let c = answer(&mut d, &topo, found(&["10.0.0.3"]));
    assert_eq!(addrs(&c.added), ["10.0.0.3:8200"]);
    assert_eq!(addrs(&c.removed), ["10.0.0.2:8200"]);
}

#[test]
fn the_system_resolver_is_the_default() {
    // Builds from /etc/resolv.conf (no lookup is sent anywhere).
    if std::path::Path::new("/etc/resolv.conf").exists() {
        let dns = Dns::new(&DiscoveryConfig::default());
        assert!(dns.is_ok(), "{:?}", dns.err());
    }
    // An IP "name" answers itself without asking any server.
    let cfg = DiscoveryConfig {
        nameservers: vec!["127.0.0.1:9".parse().unwrap()],
        timeout: Duration::from_secs(2),
        ..DiscoveryConfig::default()
    };
    let dns = Dns::new(&cfg).unwrap();
    let (_, d, _) = setup();
    let mut t = d.followed[0].stats.target.clone();
    t.name.host = "127.0.0.7".into();
    match &dns.lookup_all(&[t])[..] {
        [Answer::Found(ips, _)] => assert_eq!(ips, &["127.0.0.7".parse::<IpAddr>().unwrap()]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reload_keeps_the_names_instances() {
    let (_, mut d, topo) = setup();
    let c = answer(&mut d, &topo, found(&["10.0.0.2"]));
    let topo = topo.with_changes(&c.added, &c.removed);
    let joined = topo.find("10.0.0.2:8200".parse().unwrap()).unwrap().clone();

    let mut same = Config::from_yaml(YAML).unwrap();
    d.reload(&mut same, &topo);
    let (next, gone) = topo.reloaded(&same);
    assert!(gone.is_empty());
    let kept = next.find(joined.socket_addr).unwrap();
    assert!(
        Arc::ptr_eq(kept, &joined),
        "the instance and its state carry over"
    );

    // The name leaves the file: its instances leave with it (drained by the reload).
    let mut without = Config::from_yaml(
        "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"127.0.0.1:8200\"]\n",
    )
    .unwrap();
    d.reload(&mut without, &next);
    let (_, gone) = next.reloaded(&without);
    assert_eq!(addrs(&gone), ["10.0.0.2:8200"]);
    assert!(d.next_due().is_none());
}
