//! List queries of the REST API, with Buildbot's data-API conventions: `field=value`,
//! `field__op=value` (eq, ne, lt, le, gt, ge, contains), `order=-field,other`, `limit`,
//! `offset`. Every input is checked against the resource's fields; a bad one is an error
//! message (HTTP 400), never a panic.

use serde_json::Value;
use std::cmp::Ordering;

/// Most items one page may hold.
pub const MAX_LIMIT: usize = 1000;
/// Largest offset accepted (2^53, exact in every JSON number).
pub const MAX_OFFSET: u64 = 1 << 53;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
}

/// What values a field holds, so a filter's value can be checked before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A number (`id__gt=abc` is refused).
    Number,
    Bool,
    /// One of these words (`state=pendnig` is refused).
    Word(Vec<String>),
    /// Anything else: strings, lists (for `contains`), objects.
    Text,
}

/// One field of a listed item: its name, its kind, and whether it may be null.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub kind: Kind,
    pub nullable: bool,
}

impl Field {
    /// Reads a field from its JSON Schema (`defs` resolves `$ref`s).
    pub fn from_schema(name: &str, schema: &Value, defs: &serde_json::Map<String, Value>) -> Field {
        let mut nullable = false;
        let kind = kind_of(schema, defs, &mut nullable, 0);
        Field { name: name.to_owned(), kind, nullable }
    }

    fn check(&self, op: Op, value: &str) -> Result<(), String> {
        if op == Op::Contains {
            return Ok(());
        }
        let name = &self.name;
        match &self.kind {
            Kind::Number if value.parse::<f64>().map_or(true, |n| !n.is_finite()) => {
                Err(format!("`{name}` is a number; `{value}` is not"))
            }
            Kind::Bool if value != "true" && value != "false" => {
                Err(format!("`{name}` is true or false; `{value}` is neither"))
            }
            Kind::Word(words) if !(words.iter().any(|w| w == value) || self.nullable && value == "null") => {
                let close = rbb_compiler::diagnostic::did_you_mean(value, words.iter().map(String::as_str));
                Err(format!(
                    "`{name}` is one of {}; `{value}` is none of them{}",
                    words.join(", "),
                    close.map(|c| format!(" ({c})")).unwrap_or_default()
                ))
            }
            _ => Ok(()),
        }
    }
}

fn kind_of(schema: &Value, defs: &serde_json::Map<String, Value>, nullable: &mut bool, depth: u8) -> Kind {
    if depth > 8 {
        return Kind::Text;
    }
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return defs.get(name).map_or(Kind::Text, |d| kind_of(d, defs, nullable, depth + 1));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let mut kinds: Vec<Kind> = Vec::new();
            for alt in alts {
                if alt.get("type").and_then(Value::as_str) == Some("null") {
                    *nullable = true;
                    continue;
                }
                kinds.push(kind_of(alt, defs, nullable, depth + 1));
            }
            let mut words = Vec::new();
            for k in &kinds {
                match k {
                    Kind::Word(w) => words.extend(w.iter().cloned()),
                    _ => return if kinds.len() == 1 { k.clone() } else { Kind::Text },
                }
            }
            return Kind::Word(words);
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if values.iter().any(Value::is_null) {
            *nullable = true;
        }
        let words: Vec<String> = values.iter().filter_map(Value::as_str).map(str::to_owned).collect();
        if !words.is_empty() {
            return Kind::Word(words);
        }
    }
    if let Some(c) = schema.get("const").and_then(Value::as_str) {
        return Kind::Word(vec![c.to_owned()]);
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.contains(&"null") {
        *nullable = true;
    }
    match types.iter().find(|t| **t != "null") {
        Some(&"integer") | Some(&"number") => Kind::Number,
        Some(&"boolean") => Kind::Bool,
        _ => Kind::Text,
    }
}

#[derive(Debug, Clone)]
struct Filter {
    field: String,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    filters: Vec<Filter>,
    order: Vec<(String, bool)>,
    limit: usize,
    offset: usize,
}

impl ListQuery {
    /// Parses query pairs for a resource whose items have `fields` (of any kind). `extra`
    /// names parameters the endpoint reads itself (skipped here).
    pub fn parse(pairs: &[(String, String)], fields: &[&str], extra: &[&str]) -> Result<ListQuery, String> {
        let typed: Vec<Field> =
            fields.iter().map(|f| Field { name: (*f).to_owned(), kind: Kind::Text, nullable: true }).collect();
        ListQuery::parse_typed(pairs, &typed, extra)
    }

    /// Parses query pairs for a resource whose items have `typed` fields: a filter's value must
    /// fit its field (a number for a number, one of the words of an enumeration).
    pub fn parse_typed(pairs: &[(String, String)], typed: &[Field], extra: &[&str]) -> Result<ListQuery, String> {
        let fields: Vec<&str> = typed.iter().map(|f| f.name.as_str()).collect();
        let fields = fields.as_slice();
        let mut q = ListQuery { limit: DEFAULT_LIMIT, ..Default::default() };
        let known = |f: &str| -> Result<String, String> {
            if fields.contains(&f) {
                Ok(f.to_owned())
            } else {
                let close = rbb_compiler::diagnostic::did_you_mean(f, fields.iter().copied());
                Err(format!(
                    "unknown field `{f}`{}; fields: {}",
                    close.map(|c| format!(" ({c})")).unwrap_or_default(),
                    fields.join(", ")
                ))
            }
        };
        for (k, v) in pairs {
            match k.as_str() {
                "limit" => {
                    q.limit = v.parse().map_err(|_| format!("limit must be a number, got `{v}`"))?;
                    if q.limit > MAX_LIMIT {
                        return Err(format!("limit may be at most {MAX_LIMIT}, got {}", q.limit));
                    }
                }
                "offset" => {
                    q.offset = v.parse().map_err(|_| format!("offset must be a number, got `{v}`"))?;
                    if q.offset as u64 > MAX_OFFSET {
                        return Err(format!("offset may be at most {MAX_OFFSET}, got {}", q.offset));
                    }
                }
                "order" => {
                    for part in v.split(',').filter(|_| !v.is_empty()) {
                        let (desc, name) = match part.strip_prefix('-') {
                            Some(n) => (true, n),
                            None => (false, part),
                        };
                        q.order.push((known(name)?, desc));
                    }
                }
                k if extra.contains(&k) => {}
                k => {
                    let (field, op) = match k.rsplit_once("__") {
                        Some((f, op)) => (
                            f,
                            match op {
                                "eq" => Op::Eq,
                                "ne" => Op::Ne,
                                "lt" => Op::Lt,
                                "le" => Op::Le,
                                "gt" => Op::Gt,
                                "ge" => Op::Ge,
                                "contains" => Op::Contains,
                                other => {
                                    return Err(format!(
                                        "unknown operator `{other}` in `{k}` (eq, ne, lt, le, gt, ge, contains)"
                                    ));
                                }
                            },
                        ),
                        None => (k, Op::Eq),
                    };
                    let field = known(field)?;
                    if let Some(f) = typed.iter().find(|f| f.name == field) {
                        f.check(op, v)?;
                    }
                    q.filters.push(Filter { field, op, value: v.clone() });
                }
            }
        }
        Ok(q)
    }

    /// The first `field=value` (or `field__eq=value`) filter on one of `indexed`.
    pub fn indexed_eq(&self, indexed: &[&str]) -> Option<(&str, &str)> {
        self.filters
            .iter()
            .find(|f| f.op == Op::Eq && indexed.contains(&f.field.as_str()))
            .map(|f| (f.field.as_str(), f.value.as_str()))
    }

    /// This query without its `field=value` filter (what is left to check once an index
    /// answered it).
    pub fn without_eq(&self, field: &str, value: &str) -> ListQuery {
        let mut q = self.clone();
        if let Some(i) = q.filters.iter().position(|f| f.op == Op::Eq && f.field == field && f.value == value) {
            q.filters.remove(i);
        }
        q
    }

    /// How many filters there are.
    pub fn filter_count(&self) -> usize {
        self.filters.len()
    }

    /// `Some(newest_first)` when items may be taken in id order as they are stored (no
    /// `order`, or `order=id` / `order=-id`); `None` when they must be sorted.
    pub fn id_order(&self) -> Option<bool> {
        match self.order.as_slice() {
            [] => Some(true),
            [(f, desc)] if f == "id" => Some(*desc),
            _ => None,
        }
    }

    /// Whether `item` passes every filter.
    pub fn matches(&self, item: &Value) -> bool {
        self.filters.iter().all(|f| matches(item.get(&f.field), f))
    }

    /// How many matching items come before the page.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// A pager for items that arrive already in the requested order (see [`Pager`]).
    pub fn pager(&self, total: Option<usize>) -> Pager<'_> {
        Pager { q: self, total, matched: 0, page: Vec::new() }
    }

    /// Filters, orders and pages `items`; returns the page and the total before paging.
    pub fn apply(&self, items: Vec<Value>) -> (Vec<Value>, usize) {
        let mut kept: Vec<Value> =
            items.into_iter().filter(|it| self.filters.iter().all(|f| matches(it.get(&f.field), f))).collect();
        if !self.order.is_empty() {
            kept.sort_by(|a, b| {
                for (field, desc) in &self.order {
                    let o = compare(a.get(field), b.get(field));
                    let o = if *desc { o.reverse() } else { o };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            });
        }
        let total = kept.len();
        let page = kept.into_iter().skip(self.offset).take(self.limit).collect();
        (page, total)
    }
}

/// Pages items fed in order: keeps the matching ones inside `offset..offset+limit`.
pub struct Pager<'a> {
    q: &'a ListQuery,
    total: Option<usize>,
    matched: usize,
    page: Vec<Value>,
}

impl Pager<'_> {
    /// Takes one item; false once nothing more is needed (the page is full and the total
    /// is already known).
    pub fn push(&mut self, item: Value) -> bool {
        if self.q.matches(&item) {
            self.matched += 1;
            if self.matched > self.q.offset && self.page.len() < self.q.limit {
                self.page.push(item);
            }
        }
        !(self.total.is_some() && self.page.len() >= self.q.limit)
    }

    /// Counts one item known to match, before the page starts.
    pub fn skip_matching(&mut self) -> bool {
        self.matched += 1;
        true
    }

    /// Takes one item known to match every filter (an index answered the only one).
    pub fn push_matching(&mut self, item: Value) -> bool {
        self.matched += 1;
        if self.matched > self.q.offset && self.page.len() < self.q.limit {
            self.page.push(item);
        }
        !(self.total.is_some() && self.page.len() >= self.q.limit)
    }

    /// The page and the total of matching items.
    pub fn finish(self) -> (Vec<Value>, usize) {
        (self.page, self.total.unwrap_or(self.matched))
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

fn matches(v: Option<&Value>, f: &Filter) -> bool {
    let v = v.unwrap_or(&Value::Null);
    if f.op == Op::Contains {
        return match v {
            Value::Array(items) => items.iter().any(|i| text(i) == f.value),
            other => text(other).contains(&f.value),
        };
    }
    let o = match (v, f.value.parse::<f64>()) {
        (Value::Number(n), Ok(want)) => n.as_f64().map(|x| x.total_cmp(&want)),
        (Value::Bool(b), _) => f.value.parse::<bool>().ok().map(|w| b.cmp(&w)),
        (Value::Null, _) => Some(if f.value == "null" { Ordering::Equal } else { Ordering::Less }),
        (other, _) => Some(text(other).as_str().cmp(f.value.as_str())),
    };
    let Some(o) = o else { return false };
    match f.op {
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Lt => o == Ordering::Less,
        Op::Le => o != Ordering::Greater,
        Op::Gt => o == Ordering::Greater,
        Op::Ge => o != Ordering::Less,
        Op::Contains => false,
    }
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a.unwrap_or(&Value::Null), b.unwrap_or(&Value::Null)) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        (x, y) => text(x).cmp(&text(y)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn filters_orders_and_pages() {
        let items = vec![
            json!({"id": 1, "r": "a", "t": ["x"]}),
            json!({"id": 2, "r": "b", "t": []}),
            json!({"id": 3, "r": "a", "t": ["x", "y"]}),
        ];
        let q = ListQuery::parse(&pairs(&[("r", "a"), ("order", "-id")]), &["id", "r", "t"], &[]).expect("query");
        let (page, total) = q.apply(items.clone());
        assert_eq!(total, 2);
        assert_eq!(page[0]["id"], 3);
        let q = ListQuery::parse(&pairs(&[("id__ge", "2"), ("limit", "1"), ("offset", "1")]), &["id", "r", "t"], &[])
            .expect("query");
        let (page, total) = q.apply(items.clone());
        assert_eq!((total, page[0]["id"].clone()), (2, json!(3)));
        let q = ListQuery::parse(&pairs(&[("t__contains", "y")]), &["id", "r", "t"], &[]).expect("query");
        assert_eq!(q.apply(items).1, 1);
    }

    #[test]
    fn rejects_bad_input() {
        let f = &["id", "result"];
        assert!(ListQuery::parse(&pairs(&[("resutl", "x")]), f, &[]).unwrap_err().contains("did you mean `result`"));
        assert!(ListQuery::parse(&pairs(&[("id__like", "1")]), f, &[]).unwrap_err().contains("unknown operator"));
        assert!(ListQuery::parse(&pairs(&[("limit", "1000000")]), f, &[]).is_err());
        assert!(ListQuery::parse(&pairs(&[("limit", "ten")]), f, &[]).is_err());
        assert!(ListQuery::parse(&pairs(&[("order", "-nope")]), f, &[]).is_err());
    }
}
