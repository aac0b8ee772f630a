//! The service-file parser and validator, by example: each test asserts the exact error.

use super::*;

const OOD: &str = r#"
name = "ood001"
service_dir = "/shared/services/ood/ood001"
binds = ["/shared", "${service_dir}/root:/root"]
[[network]]
name = "macvlan_ood001"
external = true
"#;

fn p(text: &str) -> Result<Service, ConfigError> {
    parse(
        text,
        Path::new("/etc/apptainer-supervisor/ood001.toml"),
        None,
    )
}

fn one_error(text: &str) -> String {
    let e = p(text).expect_err("must fail");
    assert_eq!(e.issues().len(), 1, "{e}");
    e.to_string()
}

#[test]
fn defaults_fill_the_service_directory_layout() {
    let s = p(OOD).unwrap();
    assert_eq!(
        s.image,
        Path::new("/shared/services/ood/ood001/containers/container.sif")
    );
    assert_eq!(
        s.overlay.path,
        Path::new("/shared/services/ood/ood001/overlay/overlay.img")
    );
    assert_eq!(s.overlay.size_mib, 1024);
    assert!(s.overlay.sparse);
    assert!(s.boot);
    assert_eq!(
        s.env_file.path,
        Path::new("/shared/services/ood/ood001/bin/.service_env")
    );
    assert!(!s.env_file.explicit);
    assert_eq!(s.binds[1].spec(), "/shared/services/ood/ood001/root:/root");
    assert_eq!(s.timeouts, Timeouts::default());
}

#[test]
fn name_defaults_to_file_stem() {
    let s = p("service_dir = \"/srv/x\"").unwrap();
    assert_eq!(s.name, "ood001");
}

#[test]
fn unknown_key_names_line_column_and_key() {
    let e = one_error("service_dir = \"/x\"\n[overlay]\nsize = 3\n");
    assert!(
        e.starts_with(
            "/etc/apptainer-supervisor/ood001.toml:3:1: overlay.size: unknown field `size`"
        ),
        "{e}"
    );
}

#[test]
fn wrong_type_names_the_key() {
    let e = one_error("service_dir = \"/x\"\n[overlay]\nsize_mib = \"big\"\n");
    assert!(
        e.starts_with("/etc/apptainer-supervisor/ood001.toml:3:12: overlay.size_mib: invalid type"),
        "{e}"
    );
}

#[test]
fn syntax_error_has_position() {
    let e = one_error("service_dir = \"/x\n");
    assert!(
        e.starts_with("/etc/apptainer-supervisor/ood001.toml:1:"),
        "{e}"
    );
}

#[test]
fn relative_bind_source_is_refused_with_hint() {
    let e = one_error("service_dir = \"/x\"\nbinds = [\"shared:/shared\"]\n");
    assert_eq!(
        e,
        "/etc/apptainer-supervisor/ood001.toml:2:10: binds: \"shared:/shared\": the source is not an absolute path\n   2 | binds = [\"shared:/shared\"]\n     |          ^\n  hint: bind sources are host paths; write them in full, or use ${service_dir}/…"
    );
}

#[test]
fn duplicate_bind_target_is_refused() {
    let e = one_error("service_dir = \"/x\"\nbinds = [\"/a:/data\", \"/b:/data\"]\n");
    assert!(
        e.contains("2:22: binds: \"/b:/data\" is mounted at /data already (line 2)"),
        "{e}"
    );
}

#[test]
fn invalid_names_are_refused() {
    let long = "a".repeat(MAX_NAME_LEN + 1);
    for bad in [
        "../x",
        "a b",
        "..",
        ".",
        "x/y",
        "",
        ".hidden",
        "-x",
        "--help",
        "caf\u{e9}",
        "a\nb",
        &long,
    ] {
        let e = one_error(&format!("name = {bad:?}\nservice_dir = \"/x\"\n"));
        assert!(e.contains(":1:8: name: "), "{bad}: {e}");
    }
    for good in ["ood001", "_x", "0", "a.b-c_d", &long[1..]] {
        assert_eq!(check_name(good), Ok(()), "{good}");
    }
}

#[test]
fn network_names_follow_the_name_rule() {
    let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \".n\"\nexternal = true\n");
    assert!(
        e.contains("3:8: network.name: \".n\" starts with \".\""),
        "{e}"
    );
}

#[test]
fn csv_syntax_is_refused_where_apptainer_reads_csv() {
    let e = one_error("service_dir = \"/x\"\n[overlay]\npath = \"/o/a\\\"b.img\"\n");
    assert!(
        e.contains("overlay.path: \"/o/a\\\"b.img\" contains '\"'"),
        "{e}"
    );
    let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"n\"\nexternal = true\nargs = [\"IP=10.0.0.2/24,FOO=1\"]\n");
    assert!(
        e.contains("network.args: \"IP=10.0.0.2/24,FOO=1\" is not one KEY=VALUE"),
        "{e}"
    );
}

#[test]
fn bind_paths_apptainer_would_not_keep_are_refused() {
    for (spec, why) in [
        ("/a^b:/c", "contains '^'"),
        ("/a\\\\b:/c", "contains '\\\\'"),
        ("/a:/c ", "white space"),
        ("/a :/c", "white space"),
    ] {
        let e = one_error(&format!("service_dir = \"/x\"\nbinds = [{spec:?}]\n"));
        assert!(e.contains(why), "{spec}: {e}");
    }
    let e = one_error(
        "service_dir = \"/x\"\n[[network]]\nname = \"n\"\nexternal = true\nargs = [\"K=a=b\"]\n",
    );
    assert!(e.contains("\"K=a=b\" is not one KEY=VALUE (one '='"), "{e}");
}

#[test]
fn bind_onto_the_root_is_refused() {
    for spec in ["/srv/r:/", "/", "/srv/r:/.:ro"] {
        let e = one_error(&format!("service_dir = \"/x\"\nbinds = [{spec:?}]\n"));
        assert!(
            e.contains("the target is the container's root"),
            "{spec}: {e}"
        );
    }
}

#[test]
fn equivalent_bind_targets_are_one_target() {
    let e = one_error("service_dir = \"/x\"\nbinds = [\"/a:/d\", \"/b:/d/\"]\n");
    assert!(e.contains("is mounted at /d already"), "{e}");
    let e = one_error("service_dir = \"/x\"\nbinds = [\"/d\", \"/b://d\"]\n");
    assert!(e.contains("\"/b://d\" is mounted at /d already"), "{e}");
}

#[test]
fn name_must_match_lookup() {
    let e = parse(
        "name = \"ood002\"\nservice_dir = \"/x\"",
        Path::new("/e/ood001.toml"),
        Some("ood001"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("name: is \"ood002\", but the file was loaded as \"ood001\""),
        "{e}"
    );
}

#[test]
fn all_errors_are_collected() {
    let e = p("name = \"a b\"\nservice_dir = \"rel\"\nbinds = [\"x\"]\n[overlay]\nsize_mib = 10\n")
        .unwrap_err();
    let keys: Vec<_> = e.issues().iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["name", "service_dir", "binds", "overlay.size_mib"]);
}

#[test]
fn relative_overlay_resolves_in_service_dir() {
    let s = p("service_dir = \"/srv/ww001\"\n[overlay]\npath = \"overlay.img\"\n").unwrap();
    assert_eq!(s.overlay.path, Path::new("/srv/ww001/overlay.img"));
}

#[test]
fn unknown_substitution_is_refused() {
    let e = one_error("service_dir = \"/x\"\nimage = \"${DIRNAME}/c.sif\"\n");
    assert!(e.contains("image: unknown substitution ${DIRNAME}"), "{e}");
}

#[test]
fn parent_dir_is_refused() {
    let e = one_error("service_dir = \"/srv/../etc\"\n");
    assert!(
        e.contains("service_dir: \"/srv/../etc\" contains \"..\""),
        "{e}"
    );
}

#[test]
fn network_names_unique_and_args_checked() {
    let e = p("service_dir = \"/x\"\n[[network]]\nname = \"a\"\nexternal = true\n[[network]]\nname = \"a\"\nargs = [\"nokv\"]\nexternal = true\n").unwrap_err();
    let r: Vec<_> = e
        .issues()
        .iter()
        .map(|i| (i.line, i.key.as_str()))
        .collect();
    assert_eq!(r, [(6, "network.name"), (7, "network.args")]);
}

fn net(body: &str) -> Result<Service, ConfigError> {
    p(&format!(
        "service_dir = \"/x\"\n[[network]]\nname = \"n\"\n{body}"
    ))
}

#[test]
fn network_cni_keys_are_validated() {
    let ok = net("type = \"macvlan\"\nmaster = \"p0\"\nmode = \"bridge\"\nmtu = 1500\nmac = \"02:00:00:00:00:01\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2/24\"]\ngateway = \"10.0.0.1\"\nroutes = [\"0.0.0.0/0\", \"10.9.0.0/16 via 10.0.0.254\"]\n").unwrap();
    let cni = ok.networks[0].cni.as_ref().unwrap();
    assert_eq!(cni.kind, CniKind::Macvlan);
    assert!(matches!(&cni.ipam, Ipam::Static { routes, .. } if routes.len() == 2));
    let cases: &[(&str, &str, &str)] = &[
        ("[network.ipam]\ntype = \"dhcp\"\n", "network.type", "missing:"),
        ("type = \"macvlan\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.master", "needs its parent interface"),
        ("type = \"macvlan\"\nmaster = \"p0\"\nmode = \"l2\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.mode", "\"l2\" is not a macvlan mode"),
        ("type = \"bridge\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.master", "a bridge network has no master"),
        ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2\"]\n", "network.ipam.addresses", "needs a prefix length"),
        ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"static\"\naddresses = [\"10.0.0.2/24\"]\ngateway = \"10.0.1.1\"\n", "network.ipam.gateway", "10.0.1.1 is outside the subnet"),
        ("type = \"bridge\"\n[network.ipam]\ntype = \"host-local\"\nsubnet = \"10.22.0.0/16\"\nrange_start = \"10.23.0.1\"\n", "network.ipam.range_start", "10.23.0.1 is outside subnet 10.22.0.0/16"),
        ("type = \"macvlan\"\nmaster = \"p0\"\nmtu = 20\n[network.ipam]\ntype = \"dhcp\"\n", "network.mtu", "between 68 and 65535"),
        ("type = \"macvlan\"\nmaster = \"p0\"\nmac = \"zz\"\n[network.ipam]\ntype = \"dhcp\"\n", "network.mac", "not a MAC"),
        ("type = \"macvlan\"\nmaster = \"p0\"\n", "network.ipam.type", "missing: the [network.ipam] table"),
        ("type = \"macvlan\"\nmaster = \"p0\"\n[network.ipam]\ntype = \"dhcp\"\nrouts = []\n", "network.ipam.routs", "unknown field `routs`"),
        ("external = true\ntype = \"macvlan\"\n", "network.external", "cannot be set here"),
    ];
    for (body, key, reason) in cases {
        let e = net(body).expect_err(body);
        let i = &e.issues()[0];
        assert_eq!(i.key, *key, "{body}: {e}");
        assert!(i.reason.contains(reason), "{body}: {e}");
    }
}

#[test]
fn ipnet_contains() {
    let n = IpNet::parse("10.1.225.1/16").unwrap();
    assert!(n.contains("10.1.224.51".parse().unwrap()));
    assert!(!n.contains("10.2.0.1".parse().unwrap()));
    assert!(IpNet::parse("fd00::1/64")
        .unwrap()
        .contains("fd00::99".parse().unwrap()));
    assert!(IpNet::parse("10.0.0.1/33").is_err());
}

#[test]
fn env_file_parses_without_a_shell() {
    let env = parse_env_file("# c\n\nexport A=1\nB=\"two words\"\nC='$HOME'\nD=\n").unwrap();
    assert_eq!(
        env,
        [("A", "1"), ("B", "two words"), ("C", "$HOME"), ("D", "")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(parse_env_file("A=1\nnot a line\n").unwrap_err().0, 2);
    assert_eq!(parse_env_file("X=$(rm -rf /)\n").unwrap_err().0, 1);
    assert_eq!(parse_env_file("1X=a\n").unwrap_err().0, 1);
    assert_eq!(parse_env_file("X=\"a\n").unwrap_err().0, 1);
    // Control characters: only TAB; CRLF line ends are fine, a NUL or ESC is not.
    assert_eq!(
        parse_env_file("A=\ta b\r\nB=2\r\n").unwrap(),
        vec![("A".into(), "a b".into()), ("B".into(), "2".into())]
    );
    let (line, reason) = parse_env_file("A=1\nB=x\0y\n").unwrap_err();
    assert_eq!(
        (line, reason.as_str()),
        (
            2,
            "contains the control character U+0000; the env file holds text only (TAB is the one allowed)"
        )
    );
    assert_eq!(parse_env_file("A=\u{1b}[2J\n").unwrap_err().0, 1);
    assert_eq!(parse_env_file("A=a\rb\n").unwrap_err().0, 1);
}

#[test]
fn readiness_defaults_follow_boot() {
    let s = p("service_dir = \"/x\"\n").unwrap();
    assert_eq!(s.readiness.mode, ReadinessMode::InnerSystemd);
    assert_eq!(s.readiness.on_failure, OnFailure::RestartUnit);
    assert!(s.readiness.accept_degraded);
    let s = p("service_dir = \"/x\"\nboot = false\n").unwrap();
    assert_eq!(s.readiness.mode, ReadinessMode::Instance);
}

#[test]
fn readiness_units_are_checked() {
    let e = p("service_dir = \"/x\"\n[readiness]\nrequired_units = [\"httpd\", \"a.service\", \"a.service\"]\n").unwrap_err();
    let r: Vec<_> = e
        .issues()
        .iter()
        .map(|i| (i.column, i.reason.clone()))
        .collect();
    assert_eq!(
        r[0].1,
        "\"httpd\" is not a unit name with its type (e.g. \"httpd.service\")"
    );
    assert_eq!(r[1].1, "\"a.service\" is listed twice");
    let e = one_error("service_dir = \"/x\"\n[readiness]\nmode = \"instance\"\nrequired_units = [\"a.service\"]\n");
    assert!(
        e.contains("readiness.required_units: required units need readiness.mode"),
        "{e}"
    );
    let e =
        one_error("service_dir = \"/x\"\nboot = false\n[readiness]\nmode = \"inner-systemd\"\n");
    assert!(
        e.contains("4:8: readiness.mode: \"inner-systemd\" needs boot = true"),
        "{e}"
    );
    let e = one_error("service_dir = \"/x\"\n[readiness]\non_failure = \"reboot\"\n");
    assert!(
        e.contains("3:14: readiness.on_failure: unknown variant `reboot`"),
        "{e}"
    );
}

#[test]
fn unit_and_install_tables_are_read() {
    let s = p("service_dir = \"/x\"\n[unit]\ndescription = \"OOD portal\"\ndocumentation = [\"https://example.org/ood\"]\nafter = [\"munge.service\"]\nwants = [\"getty@tty1.service\"]\n[install]\nwanted_by = [\"multi-user.target\"]\n").unwrap();
    assert_eq!(s.unit.description.as_deref(), Some("OOD portal"));
    assert_eq!(s.unit.after, ["munge.service"]);
    assert_eq!(s.unit.wants, ["getty@tty1.service"]);
    assert_eq!(s.install.wanted_by, ["multi-user.target"]);
    assert!(s.install.required_by.is_empty() && s.unit.before.is_empty());
    assert_eq!(p(OOD).unwrap().unit, UnitDeps::default());
}

#[test]
fn unit_and_install_values_are_checked() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[unit]\nafter = [\"munge\"]\n",
            "3:10: unit.after",
            "\"munge\" is not a unit name with its type",
        ),
        (
            "[unit]\nwants = [\"getty@.service\"]\n",
            "3:10: unit.wants",
            "is a template; name an instance (getty@NAME.service)",
        ),
        (
            "[unit]\nrequires = [\"a b.service\"]\n",
            "3:13: unit.requires",
            "characters systemd does not allow",
        ),
        (
            "[unit]\nbefore = [\"a@b@c.service\"]\n",
            "3:11: unit.before",
            "more than one '@'",
        ),
        (
            "[unit]\nafter = [\"@x.service\"]\n",
            "3:10: unit.after",
            "no name before",
        ),
        (
            "[unit]\nafter = [\"x.target\", \"x.target\"]\n",
            "3:22: unit.after",
            "listed twice",
        ),
        (
            "[unit]\nafter = [\"ood001.service\"]\n",
            "3:10: unit.after",
            "the generated unit itself",
        ),
        (
            "[unit]\ndescription = \"a\\nb\"\n",
            "3:15: unit.description",
            "control character",
        ),
        (
            "[unit]\ndocumentation = [\"www.example.org\"]\n",
            "3:18: unit.documentation",
            "is not an http:",
        ),
        (
            "[unit]\ndocumentation = [\"man:a b\"]\n",
            "3:18: unit.documentation",
            "contains a space",
        ),
        (
            "[unit]\nafer = []\n",
            "3:1: unit.afer",
            "unknown field `afer`",
        ),
        (
            "[install]\nwanted_by = [\"multi-user\"]\n",
            "3:14: install.wanted_by",
            "not a unit name",
        ),
        (
            "[install]\nalso = []\n",
            "3:1: install.also",
            "unknown field `also`",
        ),
    ];
    for (body, at, reason) in cases {
        let e = one_error(&format!("service_dir = \"/x\"\n{body}"));
        assert!(e.contains(&format!("ood001.toml:{at}: ")), "{body}: {e}");
        assert!(e.contains(reason), "{body}: {e}");
    }
}

#[test]
fn key_at_finds_tables() {
    let t = "a = 1\n[[network]]\nname = 2\n";
    assert_eq!(key_at(t, t.find("2").unwrap()), "network.name");
    assert_eq!(key_at(t, 0), "a");
}

#[test]
fn capability_names_parse_as_capabilities7_spells_them() {
    assert_eq!(
        parse_cap("CAP_SYS_TIME"),
        Ok(caps::Capability::CAP_SYS_TIME)
    );
    assert_eq!(parse_cap("sys_time"), Ok(caps::Capability::CAP_SYS_TIME));
    assert!(parse_cap("CAP_FLY")
        .unwrap_err()
        .contains("not a Linux capability"));
}

#[test]
fn networks_are_only_named_in_network_tables() {
    let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"none\"\nexternal = true\n");
    assert!(
        e.contains("3:8: network.name: \"none\" is Apptainer's \"no network\""),
        "{e}"
    );
    for arg in ["--network", "--network=bridge"] {
        let e = one_error(&format!(
            "service_dir = \"/x\"\n[apptainer]\nextra_args = [\"{arg}\"]\n"
        ));
        assert!(
            e.contains("apptainer.extra_args: \"--network")
                && e.contains("networks are set with [[network]]"),
            "{e}"
        );
    }
    // Apptainer's bridge without external = true: the hint says what it is.
    let e = one_error("service_dir = \"/x\"\n[[network]]\nname = \"bridge\"\n");
    assert!(e.contains("Apptainer's own default network"), "{e}");
    let s = p("service_dir = \"/x\"\n[[network]]\nname = \"bridge\"\nexternal = true\n").unwrap();
    assert!(s.networks[0].cni.is_none());
}

#[test]
fn env_may_not_move_apptainers_state() {
    for k in STATE_DIR_ENV {
        let e = one_error(&format!("service_dir = \"/x\"\n[env]\n{k} = \"/srv\"\n"));
        assert!(
            e.contains(&format!(
                "3:1: env: {k} would move Apptainer's instance state"
            )),
            "{e}"
        );
    }
}

#[test]
fn a_booted_instance_without_hostname_needs_a_name_apptainer_takes_as_host_name() {
    // Apptainer would refuse each of these at every start ("… is not a valid hostname").
    for bad in ["ood_001", "a..b", "a-", "a.-b"] {
        let e = one_error(&format!("name = {bad:?}\nservice_dir = \"/x\"\n"));
        assert!(
            e.contains(":1:8: name: a booted instance takes its name as host name"),
            "{bad}: {e}"
        );
        assert!(
            e.contains("hint: set a host name Apptainer accepts"),
            "{bad}: {e}"
        );
        // Fine with a host name of its own, or without --boot (no UTS namespace then).
        let named = format!("name = {bad:?}\nservice_dir = \"/x\"\nhostname = \"ood-001\"\n");
        assert!(p(&named).is_ok(), "{bad}");
        let unbooted = format!(
            "name = {bad:?}\nservice_dir = \"/x\"\nboot = false\n[readiness]\nmode = \"instance\"\n"
        );
        assert!(p(&unbooted).is_ok(), "{bad}: {:?}", p(&unbooted).err());
    }
    for bad in ["-a", "a-", "a..b", ".a", "a_b", "a b"] {
        assert!(check_hostname(bad).is_err(), "{bad}");
    }
    for good in ["ood001", "a.b-c", "x", "login-005.cluster"] {
        assert_eq!(check_hostname(good), Ok(()), "{good}");
    }
}

#[test]
fn overlay_create_deadline_scales_with_the_size_unless_set() {
    let s = p("service_dir = \"/srv/x\"\n[overlay]\nsize_mib = 100000\n").unwrap();
    assert_eq!(s.timeouts.overlay_create_sec, None);
    // 60 s and 1 s per GiB, a started GiB counting whole.
    assert_eq!(
        s.timeouts.overlay_create(s.overlay.size_mib).as_secs(),
        60 + 98
    );
    assert_eq!(s.timeouts.overlay_create(64).as_secs(), 61);
    let s = p("service_dir = \"/srv/x\"\n[timeouts]\noverlay_create_sec = 7\n").unwrap();
    assert_eq!(s.timeouts.overlay_create(100_000).as_secs(), 7);
    let e = one_error("service_dir = \"/srv/x\"\n[timeouts]\noverlay_create_sec = 0\n");
    assert!(
        e.contains("timeouts.overlay_create_sec") && e.contains("at least 1"),
        "{e}"
    );
}
