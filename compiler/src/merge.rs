//! Merge: every repository's lowered builders into one DAG.
//!
//! Resolves `needs` (local names, `repo/name`, matrix families), rejects unknown names (with
//! candidates) and cycles (with the cycle spelled out), computes the static cache keys in
//! topological order and the plan hash. The output is sorted, so the same inputs give
//! byte-identical JSON whatever order the repositories came in.

use crate::Options;
use crate::cache_key;
use crate::diagnostic::{Diagnostic, Diagnostics, Severity, did_you_mean, name_list};
use crate::lower::Lowered;
use crate::parse::Source;
use crate::spans::Pos;
use petgraph::graph::{DiGraph, NodeIndex};
use rbb_schema::plan::{PLAN_FORMAT, Plan, PlanRepo};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What the per-file passes could not read, already reported: `needs` naming it are not
/// reported a second time.
#[derive(Debug, Default, Clone)]
pub(crate) struct Broken {
    /// (repository, builder name) of builders with errors of their own.
    pub builders: BTreeSet<(String, String)>,
    /// Repositories whose whole file could not be read.
    pub repos: BTreeSet<String>,
}

pub(crate) fn merge(
    sources: &[Source],
    mut lowered: Vec<Lowered>,
    broken: &Broken,
    opts: &Options,
    diags: &mut Diagnostics,
) -> Option<Plan> {
    lowered.sort_by(|a, b| a.builder.id.cmp(&b.builder.id));
    let err = |l: &Lowered, pos: Pos, code: &'static str, message: String, hint: Option<String>| Diagnostic {
        severity: Severity::Error,
        code,
        repo: Some(l.builder.repo.clone()),
        file: sources[l.file].file.clone(),
        line: pos.line,
        col: pos.col,
        message,
        hint,
    };

    // Ids are unique (two definitions of one id can only come from different files of the
    // same repository name, or a matrix include repeating an expansion).
    let mut dup = BTreeSet::new();
    for pair in lowered.windows(2) {
        if pair[0].builder.id == pair[1].builder.id && dup.insert(pair[0].builder.id.clone()) {
            let at = Pos { line: pair[1].builder.source.line, col: pair[1].builder.source.col };
            diags.push(err(
                &pair[1],
                at,
                "duplicate-builder",
                format!("builder `{}` is defined twice", pair[1].builder.id),
                Some(format!("the other definition is in {}", sources[pair[0].file].file)),
            ));
        }
    }
    lowered.dedup_by(|a, b| a.builder.id == b.builder.id);

    let index: HashMap<&str, usize> = lowered.iter().enumerate().map(|(i, l)| (l.builder.id.as_str(), i)).collect();
    let mut families: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, l) in lowered.iter().enumerate() {
        families.entry((l.builder.repo.as_str(), l.builder.name.as_str())).or_default().push(i);
    }
    let repos: BTreeSet<&str> = sources.iter().map(|s| s.repo.as_str()).collect();

    // Resolve needs into edges (upstream index, downstream index, position of the need).
    let mut edges: Vec<(usize, usize, Pos)> = Vec::new();
    // Builders left out because they need a repository whose pipeline does not compile:
    // index → that repository.
    let mut left_out: BTreeMap<usize, String> = BTreeMap::new();
    for (i, l) in lowered.iter().enumerate() {
        for (raw, pos) in &l.needs {
            let (repo, name) = match raw.split_once('/') {
                Some((r, n)) => (r, n),
                None => (l.builder.repo.as_str(), raw.as_str()),
            };
            let targets: Vec<usize> = if let Some(&t) = index.get(format!("{repo}/{name}").as_str()) {
                vec![t]
            } else {
                families.get(&(repo, name)).cloned().unwrap_or_default()
            };
            if targets.is_empty() && opts.other_repos_unknown && !repos.contains(repo) {
                continue;
            }
            if targets.is_empty()
                && (broken.repos.contains(repo)
                    || broken.builders.contains(&(repo.to_owned(), name.split('[').next().unwrap_or(name).to_owned())))
            {
                // Needs a builder that has its own errors, already reported.
                continue;
            }
            if targets.is_empty()
                && !repos.contains(repo)
                && let Some(file) = opts.broken_repos.get(repo)
            {
                diags.push(Diagnostic {
                    severity: Severity::Warning,
                    ..err(
                        l,
                        *pos,
                        "needs-broken-repo",
                        format!(
                            "builder `{}` needs `{raw}`, but the pipeline of repository `{repo}` does not compile; \
                             `{}` is left out of the plan until it does",
                            l.builder.id, l.builder.id
                        ),
                        Some(format!("the mistake is in {file}, not here: fix that file")),
                    )
                });
                left_out.insert(i, repo.to_owned());
                continue;
            }
            if targets.is_empty() {
                let d = if !repos.contains(repo) {
                    let known: Vec<&str> = repos.iter().copied().collect();
                    err(
                        l,
                        *pos,
                        "needs-unknown",
                        format!("builder `{}` needs `{raw}`, but there is no repository `{repo}`", l.builder.id),
                        Some(match did_you_mean(repo, known.iter().copied()) {
                            Some(d) => format!("{d} repositories: {}", name_list(&known, 10)),
                            None => format!("repositories: {}", name_list(&known, 10)),
                        }),
                    )
                } else {
                    let mut known: Vec<&str> = families.keys().filter(|(r, _)| *r == repo).map(|(_, n)| *n).collect();
                    known.dedup();
                    let candidates = match did_you_mean(name, known.iter().copied()) {
                        Some(d) => format!("{d} builders in {repo}: {}", name_list(&known, 10)),
                        None => format!("builders in {repo}: {}", name_list(&known, 10)),
                    };
                    err(
                        l,
                        *pos,
                        "needs-unknown",
                        format!(
                            "builder `{}` needs `{raw}`, but repository `{repo}` has no builder `{name}`",
                            l.builder.id
                        ),
                        Some(candidates),
                    )
                };
                diags.push(d);
                continue;
            }
            for t in targets {
                edges.push((t, i, *pos));
            }
        }
    }

    // Whatever needs a left-out builder is left out too.
    loop {
        let mut grew = false;
        for (from, to, pos) in &edges {
            if let Some(repo) = left_out.get(from).cloned()
                && !left_out.contains_key(to)
            {
                let l = &lowered[*to];
                diags.push(Diagnostic {
                    severity: Severity::Warning,
                    ..err(
                        l,
                        *pos,
                        "needs-broken-repo",
                        format!(
                            "builder `{}` needs `{}`, which is left out of the plan because the pipeline of \
                             repository `{repo}` does not compile; `{}` is left out too",
                            l.builder.id, lowered[*from].builder.id, l.builder.id
                        ),
                        opts.broken_repos.get(&repo).map(|file| format!("the mistake is in {file}: fix that file")),
                    )
                });
                left_out.insert(*to, repo);
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    edges.retain(|(from, to, _)| !left_out.contains_key(from) && !left_out.contains_key(to));

    let mut graph: DiGraph<usize, Pos> = DiGraph::with_capacity(lowered.len(), edges.len());
    let nodes: Vec<NodeIndex> = (0..lowered.len()).map(|i| graph.add_node(i)).collect();
    for (from, to, pos) in &edges {
        graph.update_edge(nodes[*from], nodes[*to], *pos);
    }

    // Cycles: every strongly connected component with more than one node, or a self-loop.
    let mut sccs = petgraph::algo::tarjan_scc(&graph);
    sccs.sort_by_key(|c| c.iter().map(|n| graph[*n]).min());
    for scc in &sccs {
        let self_loop = scc.len() == 1 && graph.find_edge(scc[0], scc[0]).is_some();
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let cycle = spell_cycle(&graph, scc);
        let first = cycle[0];
        let second = cycle.get(1).copied().unwrap_or(first);
        // Point at `first`'s need of `second` (the graph edge runs upstream → downstream).
        let pos = graph
            .find_edge(nodes[second], nodes[first])
            .map(|e| graph[e])
            .unwrap_or(Pos { line: lowered[first].builder.source.line, col: lowered[first].builder.source.col });
        let mut names: Vec<&str> = cycle.iter().map(|&i| lowered[i].builder.id.as_str()).collect();
        names.push(lowered[first].builder.id.as_str());
        diags.push(err(
            &lowered[first],
            pos,
            "cycle",
            format!("dependency cycle: {}", names.join(" → ")),
            Some("each arrow reads \"needs\"; a builder cannot wait for itself, so remove one of these `needs`".into()),
        ));
    }

    if diags.has_errors() {
        return None;
    }

    // Topological order (no cycles are left), then keys.
    let order = petgraph::algo::toposort(&graph, None).ok()?;
    let mut last_key: Vec<String> = vec![String::new(); lowered.len()];
    let mut needs_ids: Vec<BTreeSet<String>> = vec![BTreeSet::new(); lowered.len()];
    for (from, to, _) in &edges {
        needs_ids[*to].insert(lowered[*from].builder.id.clone());
    }
    for n in order {
        let i = graph[n];
        let mut upstream: Vec<String> =
            graph.neighbors_directed(n, petgraph::Direction::Incoming).map(|u| last_key[graph[u]].clone()).collect();
        upstream.sort();
        upstream.dedup();
        let builder = &mut lowered[i].builder;
        let mut prev: Option<String> = None;
        for step in &mut builder.steps {
            step.key = cache_key::step_key(step, &builder.services, prev.as_deref(), &upstream);
            prev = Some(step.key.clone());
        }
        last_key[i] = prev.unwrap_or_default();
    }

    let mut builders = Vec::with_capacity(lowered.len());
    for (i, l) in lowered.into_iter().enumerate() {
        if left_out.contains_key(&i) {
            continue;
        }
        let mut b = l.builder;
        b.needs = needs_ids[i].iter().cloned().collect();
        builders.push(b);
    }
    let mut plan_repos: Vec<PlanRepo> = sources
        .iter()
        .map(|s| PlanRepo {
            name: s.repo.clone(),
            url: s.origin.url.clone(),
            branch: s.branch.clone(),
            commit: s.origin.commit.clone(),
            pipeline_path: s.origin.pipeline_path.clone(),
            pipeline_blob: s.origin.blob.clone(),
        })
        .collect();
    plan_repos.sort_by(|a, b| a.name.cmp(&b.name));
    plan_repos.dedup_by(|a, b| a.name == b.name);
    let mut plan = Plan { format: PLAN_FORMAT, hash: String::new(), repos: plan_repos, builders };
    plan.hash = cache_key::plan_hash(&plan);
    Some(plan)
}

/// The nodes of a strongly connected component in cycle order, starting from the smallest.
fn spell_cycle(graph: &DiGraph<usize, Pos>, scc: &[NodeIndex]) -> Vec<usize> {
    let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
    let Some(&start) = scc.iter().min_by_key(|n| graph[**n]) else {
        return Vec::new();
    };
    if scc.len() == 1 {
        return vec![graph[start]];
    }
    // Depth-first search for a path back to `start` inside the component.
    let mut path = vec![start];
    let mut visited = BTreeSet::from([start]);
    fn dfs(
        graph: &DiGraph<usize, Pos>,
        members: &BTreeSet<NodeIndex>,
        start: NodeIndex,
        path: &mut Vec<NodeIndex>,
        visited: &mut BTreeSet<NodeIndex>,
    ) -> bool {
        let Some(&at) = path.last() else { return false };
        let mut next: Vec<NodeIndex> =
            graph.neighbors_directed(at, petgraph::Direction::Incoming).filter(|n| members.contains(n)).collect();
        next.sort_by_key(|n| graph[*n]);
        for n in next {
            if n == start {
                return true;
            }
            if visited.insert(n) {
                path.push(n);
                if dfs(graph, members, start, path, visited) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    dfs(graph, &members, start, &mut path, &mut visited);
    path.into_iter().map(|n| graph[n]).collect()
}
