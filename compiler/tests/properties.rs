//! Property tests: the compiler never panics, merging is deterministic, and the DAG it builds
//! is exactly the one the `needs` describe (acyclic when they are, a cycle error when not).

use proptest::prelude::*;
use rbb_compiler::snippet::NoSnippets;
use rbb_compiler::{FrontEndCache, Options, Origin, Source, compile, compile_incremental};
use std::collections::{BTreeMap, BTreeSet};

fn source(repo: &str, text: String) -> Source {
    Source {
        repo: repo.to_owned(),
        file: format!("{repo}/.rbb/pipeline.yaml"),
        text,
        branch: "main".into(),
        files: Default::default(),
        origin: Origin {
            url: format!("repos/{repo}"),
            pipeline_path: ".rbb/pipeline.yaml".into(),
            ..Default::default()
        },
        not_utf8: None,
    }
}

/// A fleet: `repos[r][b]` lists the needs of builder `b` of repository `r` as (repo, builder).
type Fleet = Vec<Vec<Vec<(usize, usize)>>>;

fn render(fleet: &Fleet) -> Vec<Source> {
    fleet
        .iter()
        .enumerate()
        .map(|(r, builders)| {
            let mut text = String::from("builders:\n");
            for (b, needs) in builders.iter().enumerate() {
                text.push_str(&format!("  b{b}:\n"));
                if !needs.is_empty() {
                    let names: Vec<String> = needs
                        .iter()
                        .map(|(nr, nb)| if *nr == r { format!("b{nb}") } else { format!("r{nr}/b{nb}") })
                        .collect();
                    text.push_str(&format!("    needs: [{}]\n", names.join(", ")));
                }
                text.push_str(&format!("    steps:\n      - run: echo r{r} b{b}\n"));
            }
            source(&format!("r{r}"), text)
        })
        .collect()
}

/// Fleets whose needs may point anywhere (so cycles happen).
fn any_fleet() -> impl Strategy<Value = Fleet> {
    (1usize..4, 1usize..5).prop_flat_map(|(repos, builders)| {
        let need = (0..repos, 0..builders);
        prop::collection::vec(prop::collection::vec(prop::collection::vec(need, 0..3), builders), repos)
    })
}

/// Fleets whose needs only point to builders earlier in a global order (never a cycle).
fn acyclic_fleet() -> impl Strategy<Value = Fleet> {
    any_fleet().prop_map(|fleet| {
        let builders = fleet.first().map(Vec::len).unwrap_or(0);
        let rank = |r: usize, b: usize| r * builders + b;
        fleet
            .iter()
            .enumerate()
            .map(|(r, bs)| {
                bs.iter()
                    .enumerate()
                    .map(|(b, needs)| needs.iter().copied().filter(|&(nr, nb)| rank(nr, nb) < rank(r, b)).collect())
                    .collect()
            })
            .collect()
    })
}

fn has_cycle(fleet: &Fleet) -> bool {
    // Depth-first search over (repo, builder) nodes.
    fn visit(fleet: &Fleet, n: (usize, usize), state: &mut BTreeMap<(usize, usize), u8>) -> bool {
        match state.get(&n) {
            Some(1) => return true,
            Some(2) => return false,
            _ => {}
        }
        state.insert(n, 1);
        for &m in &fleet[n.0][n.1] {
            if visit(fleet, m, state) {
                return true;
            }
        }
        state.insert(n, 2);
        false
    }
    let mut state = BTreeMap::new();
    (0..fleet.len()).any(|r| (0..fleet[r].len()).any(|b| visit(fleet, (r, b), &mut state)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(text in ".{0,400}") {
        let result = compile(&[source("app", text)], &NoSnippets, &Options::default());
        // Either a plan or at least one diagnostic that says where.
        prop_assert!(result.plan.is_some() || !result.diagnostics.is_empty());
    }

    #[test]
    fn never_panics_on_yaml_shaped_text(
        lines in prop::collection::vec(
            (0usize..4, prop::sample::select(vec![
                "builders:", "steps:", "- run: make", "needs: [a, b]", "matrix:", "os: [a, b]",
                "a:", "b:", "on:", "push: {}", "timeout: 5m", "- name: x", "extends: t",
                "templates:", "t:", "labels: [x]", "exclude: [{os: a}]", "cron: \"* * * * *\"",
                "schedule:", "if: \"branch == 'x'\"", "<<: *anchor", "&anchor", "generate:", "? complex",
                "run: \"${{ matrix.os }}\"", "include: [{os: c}]", "- [1, 2]", "{", "}", "env: {A: 1}",
            ])),
            0..30,
        )
    ) {
        let text: String = lines.iter().map(|(indent, l)| format!("{}{}\n", "  ".repeat(*indent), l)).collect();
        let result = compile(&[source("app", text)], &NoSnippets, &Options::default());
        for d in &result.diagnostics {
            prop_assert!(!d.message.is_empty());
            prop_assert_eq!(&d.file, "app/.rbb/pipeline.yaml");
        }
    }

    #[test]
    fn acyclic_needs_compile_and_the_plan_respects_them(fleet in acyclic_fleet()) {
        let sources = render(&fleet);
        let result = compile(&sources, &NoSnippets, &Options::default());
        prop_assert!(result.diagnostics.is_empty(), "{:?}", result.diagnostics);
        let plan = result.plan.expect("plan");
        // Every need became an edge, and nothing else did.
        for (r, bs) in fleet.iter().enumerate() {
            for (b, needs) in bs.iter().enumerate() {
                let id = format!("r{r}/b{b}");
                let want: BTreeSet<String> = needs.iter().map(|(nr, nb)| format!("r{nr}/b{nb}")).collect();
                let got: BTreeSet<String> = plan.builder(&id).expect("builder").needs.iter().cloned().collect();
                prop_assert_eq!(want, got);
            }
        }
        // A topological order exists: repeatedly take builders whose needs are all done.
        let mut done = BTreeSet::new();
        while done.len() < plan.builders.len() {
            let ready: Vec<&str> = plan.builders.iter()
                .filter(|b| !done.contains(b.id.as_str()) && b.needs.iter().all(|n| done.contains(n.as_str())))
                .map(|b| b.id.as_str()).collect();
            prop_assert!(!ready.is_empty(), "no builder is ready: the plan has a cycle");
            done.extend(ready);
        }
    }

    #[test]
    fn merge_is_deterministic_in_any_order(fleet in acyclic_fleet(), seed in any::<u64>()) {
        let sources = render(&fleet);
        let mut shuffled = sources.clone();
        // A seeded rotation plus reversal: a different order of the same sources.
        let k = (seed as usize) % shuffled.len().max(1);
        shuffled.rotate_left(k);
        if seed % 2 == 0 { shuffled.reverse(); }
        let a = compile(&sources, &NoSnippets, &Options::default()).plan.expect("plan");
        let b = compile(&shuffled, &NoSnippets, &Options::default()).plan.expect("plan");
        prop_assert_eq!(serde_json::to_string(&a).expect("json"), serde_json::to_string(&b).expect("json"));
    }

    #[test]
    fn cycles_are_reported_exactly_when_present(fleet in any_fleet()) {
        let sources = render(&fleet);
        let result = compile(&sources, &NoSnippets, &Options::default());
        let reported = result.diagnostics.iter().any(|d| d.code == "cycle");
        prop_assert_eq!(reported, has_cycle(&fleet), "{:?}", result.diagnostics);
        prop_assert_eq!(result.plan.is_some(), !reported);
    }

    #[test]
    fn a_change_upstream_rekeys_exactly_the_builders_downstream(fleet in acyclic_fleet(), pick in any::<prop::sample::Index>()) {
        let sources = render(&fleet);
        let before = compile(&sources, &NoSnippets, &Options::default()).plan.expect("plan");
        let all: Vec<(usize, usize)> = fleet.iter().enumerate().flat_map(|(r, bs)| (0..bs.len()).map(move |b| (r, b))).collect();
        let (r, b) = *pick.get(&all);
        let mut changed = sources.clone();
        changed[r].text = changed[r].text.replace(&format!("echo r{r} b{b}\n"), &format!("echo r{r} b{b} changed\n"));
        let after = compile(&changed, &NoSnippets, &Options::default()).plan.expect("plan");
        // Downstream of (r, b): everything that transitively needs it, and itself.
        let mut down = BTreeSet::from([format!("r{r}/b{b}")]);
        loop {
            let more: Vec<String> = before.builders.iter()
                .filter(|x| !down.contains(&x.id) && x.needs.iter().any(|n| down.contains(n)))
                .map(|x| x.id.clone()).collect();
            if more.is_empty() { break; }
            down.extend(more);
        }
        for (x, y) in before.builders.iter().zip(&after.builders) {
            prop_assert_eq!(x.steps[0].key != y.steps[0].key, down.contains(&x.id), "{}", x.id);
        }
    }

    /// A sequence of fleets through one cache (edits of one repository, a different order, a
    /// commit of a new origin, a repository that breaks and comes back) compiles to exactly
    /// what a full compile gives: the same plan JSON and the same diagnostics.
    #[test]
    fn incremental_compiles_equal_full_compiles(
        fleet in any_fleet(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4), 1..6),
    ) {
        let cache = FrontEndCache::new(8);
        let mut sources = render(&fleet);
        let check = |sources: &[Source]| -> Result<(), TestCaseError> {
            let full = compile(sources, &NoSnippets, &Options::default());
            let inc = compile_incremental(sources, &NoSnippets, &Options::default(), &cache);
            prop_assert_eq!(serde_json::to_string(&full.plan).expect("json"), serde_json::to_string(&inc.plan).expect("json"));
            prop_assert_eq!(full.diagnostics, inc.diagnostics);
            Ok(())
        };
        check(&sources)?;
        for (n, (pick, what)) in edits.into_iter().enumerate() {
            let r = pick.index(sources.len());
            match what {
                0 => sources[r].text.push_str(&format!("  extra{n}:\n    steps:\n      - run: echo {n}\n")),
                1 => sources.reverse(),
                2 => sources[r].origin.commit = Some(format!("{n:040}")),
                _ => {
                    let good = sources[r].text.clone();
                    sources[r].text.push_str("  broken:\n    steps: 3\n");
                    check(&sources)?;
                    sources[r].text = good;
                }
            }
            check(&sources)?;
        }
    }
}
