//! Ordered tables of typed keys and values, the one interface every table of the state is
//! written through: over redb (one file, one master) or over PostgreSQL (a database several
//! masters can reach). Both give the same answers: keys are ordered the same way (the
//! PostgreSQL encoding of a key sorts bytewise as redb sorts the key), a write transaction
//! is stored whole or not at all, and a table that was never written reads as empty.

use super::pg;
use super::{StoreError, db};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use std::ops::{Bound, RangeBounds};

/// A key or value type a table may hold, with its owned form and its PostgreSQL encoding.
pub trait Codec: redb::Value + 'static {
    type Owned;
    fn own(v: Self::SelfType<'_>) -> Self::Owned;
    fn borrow(o: &Self::Owned) -> Self::SelfType<'_>;
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a>;
    /// Appends an order-preserving encoding: the byte order of two encodings is the order of
    /// the values.
    fn key(v: &Self::SelfType<'_>, out: &mut Vec<u8>);
    /// Reads back what [`Codec::key`] wrote, advancing `b` past it.
    fn unkey(b: &mut &[u8]) -> Option<Self::Owned>;
    /// The encoding of a value (need not sort).
    fn val(v: &Self::SelfType<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        Self::key(v, &mut out);
        out
    }
    fn unval(mut b: &[u8]) -> Option<Self::Owned> {
        Self::unkey(&mut b)
    }
}

impl Codec for u64 {
    type Owned = u64;
    fn own(v: u64) -> u64 {
        v
    }
    fn borrow(o: &u64) -> u64 {
        *o
    }
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a> {
        *v
    }
    fn key(v: &u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_be_bytes());
    }
    fn unkey(b: &mut &[u8]) -> Option<u64> {
        let (head, rest) = b.split_first_chunk::<8>()?;
        *b = rest;
        Some(u64::from_be_bytes(*head))
    }
}

impl Codec for () {
    type Owned = ();
    fn own(_: ()) {}
    fn borrow(_: &()) {}
    fn copy<'a>(_: &Self::SelfType<'a>) -> Self::SelfType<'a> {}
    fn key(_: &(), _: &mut Vec<u8>) {}
    fn unkey(_: &mut &[u8]) -> Option<()> {
        Some(())
    }
}

/// Bytes in a key: each 0x00 becomes 0x00 0xFF and the end is 0x00 0x00, so a prefix sorts
/// before what extends it and a tuple's next element never mixes into this one.
fn key_bytes(v: &[u8], out: &mut Vec<u8>) {
    for &c in v {
        out.push(c);
        if c == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

fn unkey_bytes(b: &mut &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        match *b.get(i)? {
            0 => match *b.get(i + 1)? {
                0 => {
                    *b = &b[i + 2..];
                    return Some(out);
                }
                0xFF => {
                    out.push(0);
                    i += 2;
                }
                _ => return None,
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
}

impl Codec for &'static str {
    type Owned = String;
    fn own(v: &str) -> String {
        v.to_owned()
    }
    fn borrow(o: &String) -> &str {
        o
    }
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a> {
        v
    }
    fn key(v: &&str, out: &mut Vec<u8>) {
        key_bytes(v.as_bytes(), out)
    }
    fn unkey(b: &mut &[u8]) -> Option<String> {
        String::from_utf8(unkey_bytes(b)?).ok()
    }
    fn val(v: &&str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }
    fn unval(b: &[u8]) -> Option<String> {
        String::from_utf8(b.to_vec()).ok()
    }
}

impl Codec for &'static [u8] {
    type Owned = Vec<u8>;
    fn own(v: &[u8]) -> Vec<u8> {
        v.to_vec()
    }
    fn borrow(o: &Vec<u8>) -> &[u8] {
        o
    }
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a> {
        v
    }
    fn key(v: &&[u8], out: &mut Vec<u8>) {
        key_bytes(v, out)
    }
    fn unkey(b: &mut &[u8]) -> Option<Vec<u8>> {
        unkey_bytes(b)
    }
    fn val(v: &&[u8]) -> Vec<u8> {
        v.to_vec()
    }
    fn unval(b: &[u8]) -> Option<Vec<u8>> {
        Some(b.to_vec())
    }
}

impl<A: Codec, B: Codec> Codec for (A, B) {
    type Owned = (A::Owned, B::Owned);
    fn own(v: Self::SelfType<'_>) -> Self::Owned {
        (A::own(v.0), B::own(v.1))
    }
    fn borrow(o: &Self::Owned) -> Self::SelfType<'_> {
        (A::borrow(&o.0), B::borrow(&o.1))
    }
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a> {
        (A::copy(&v.0), B::copy(&v.1))
    }
    fn key(v: &Self::SelfType<'_>, out: &mut Vec<u8>) {
        A::key(&v.0, out);
        B::key(&v.1, out);
    }
    fn unkey(b: &mut &[u8]) -> Option<Self::Owned> {
        Some((A::unkey(b)?, B::unkey(b)?))
    }
}

impl<A: Codec, B: Codec, C: Codec> Codec for (A, B, C) {
    type Owned = (A::Owned, B::Owned, C::Owned);
    fn own(v: Self::SelfType<'_>) -> Self::Owned {
        (A::own(v.0), B::own(v.1), C::own(v.2))
    }
    fn borrow(o: &Self::Owned) -> Self::SelfType<'_> {
        (A::borrow(&o.0), B::borrow(&o.1), C::borrow(&o.2))
    }
    fn copy<'a>(v: &Self::SelfType<'a>) -> Self::SelfType<'a> {
        (A::copy(&v.0), B::copy(&v.1), C::copy(&v.2))
    }
    fn key(v: &Self::SelfType<'_>, out: &mut Vec<u8>) {
        A::key(&v.0, out);
        B::key(&v.1, out);
        C::key(&v.2, out);
    }
    fn unkey(b: &mut &[u8]) -> Option<Self::Owned> {
        Some((A::unkey(b)?, B::unkey(b)?, C::unkey(b)?))
    }
}

fn enc_key<K: Codec>(k: &K::SelfType<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    K::key(k, &mut out);
    out
}

fn corrupt(table: &str, what: &str) -> StoreError {
    StoreError::Corrupt { table: "kv", key: 0, message: format!("table {table}: undecodable {what}") }
}

/// Where the state lives.
pub enum Db {
    Redb(redb::Database),
    Pg(Box<pg::Pg>),
}

/// A write transaction: its writes are stored together at [`WriteTxn::commit`], or not at all
/// when it is dropped.
pub enum WriteTxn<'d> {
    Redb(Box<redb::WriteTransaction>),
    Pg(pg::Write<'d>),
}

/// A read transaction (redb: a snapshot; PostgreSQL: each read sees what was committed when
/// it ran, which every reader of the state tolerates: a listed id whose record is gone is
/// skipped).
pub enum ReadTxn<'d> {
    Redb(redb::ReadTransaction),
    Pg(pg::Read<'d>),
}

impl Db {
    /// Starts a write transaction; a `durable` one is on disk when its commit returns.
    pub fn begin_write(&self, durable: bool) -> Result<WriteTxn<'_>, StoreError> {
        match self {
            Db::Redb(d) => {
                let mut txn = d.begin_write().map_err(db)?;
                if !durable {
                    txn.set_durability(redb::Durability::None).map_err(db)?;
                }
                Ok(WriteTxn::Redb(Box::new(txn)))
            }
            Db::Pg(p) => Ok(WriteTxn::Pg(p.begin_write(durable)?)),
        }
    }

    pub fn begin_read(&self) -> Result<ReadTxn<'_>, StoreError> {
        match self {
            Db::Redb(d) => Ok(ReadTxn::Redb(d.begin_read().map_err(db)?)),
            Db::Pg(p) => Ok(ReadTxn::Pg(p.begin_read()?)),
        }
    }
}

impl WriteTxn<'_> {
    /// Opens (creating if needed) a table for reading and writing.
    pub fn open_table<K: redb::Key + Codec, V: Codec>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Table<'_, K, V>, StoreError> {
        match self {
            WriteTxn::Redb(txn) => Ok(Table { inner: Inner::Write(txn.open_table(def).map_err(db)?) }),
            WriteTxn::Pg(w) => Ok(Table { inner: Inner::Pg(w.table(def.name())?) }),
        }
    }

    pub fn commit(self) -> Result<(), StoreError> {
        match self {
            WriteTxn::Redb(txn) => txn.commit().map_err(db),
            WriteTxn::Pg(w) => w.commit(),
        }
    }
}

impl ReadTxn<'_> {
    /// Opens a table for reading; one never written reads as empty.
    pub fn open_table<K: redb::Key + Codec, V: Codec>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Table<'_, K, V>, StoreError> {
        match self {
            ReadTxn::Redb(txn) => match txn.open_table(def) {
                Ok(t) => Ok(Table { inner: Inner::Read(t) }),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(Table { inner: Inner::Missing }),
                Err(e) => Err(db(e)),
            },
            ReadTxn::Pg(r) => Ok(Table { inner: r.table(def.name())?.map_or(Inner::Missing, Inner::Pg) }),
        }
    }
}

enum Inner<'t, K: redb::Key + 'static, V: redb::Value + 'static> {
    Write(redb::Table<'t, K, V>),
    Read(redb::ReadOnlyTable<K, V>),
    Missing,
    Pg(pg::Table<'t>),
}

/// One table, open in a transaction.
pub struct Table<'t, K: redb::Key + Codec, V: Codec> {
    inner: Inner<'t, K, V>,
}

/// A row, owned.
pub type Row<K, V> = (<K as Codec>::Owned, <V as Codec>::Owned);

/// Rows in key order (or reversed), owned.
pub type Rows<'t, K, V> = Box<dyn Iterator<Item = Result<(<K as Codec>::Owned, <V as Codec>::Owned), StoreError>> + 't>;

fn owned<K: redb::Key + Codec, V: Codec>(
    row: Result<(redb::AccessGuard<'_, K>, redb::AccessGuard<'_, V>), redb::StorageError>,
) -> Result<(K::Owned, V::Owned), StoreError> {
    let (k, v) = row.map_err(db)?;
    Ok((K::own(k.value()), V::own(v.value())))
}

fn bound<'a, K: Codec>(b: Bound<&K::SelfType<'a>>) -> Bound<K::SelfType<'a>> {
    match b {
        Bound::Included(k) => Bound::Included(K::copy(k)),
        Bound::Excluded(k) => Bound::Excluded(K::copy(k)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn enc_bound<K: Codec>(b: &Bound<K::SelfType<'_>>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(k) => Bound::Included(enc_key::<K>(k)),
        Bound::Excluded(k) => Bound::Excluded(enc_key::<K>(k)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl<K: redb::Key + Codec> Table<'_, K, u64> {
    /// Adds `delta` to the count at `k`, never below zero; a count that ends at zero is
    /// removed. On PostgreSQL the sum is the server's, sent with the transaction's writes (no
    /// round trip to read the count first).
    pub fn add(&mut self, k: K::SelfType<'_>, delta: i64) -> Result<(), StoreError> {
        if let Inner::Pg(t) = &self.inner {
            return t.add(&enc_key::<K>(&k), delta);
        }
        let now = self.get(K::copy(&k))?.unwrap_or(0);
        match now.saturating_add_signed(delta) {
            0 => self.delete(k),
            next => self.insert(k, next),
        }
    }
}

impl<'t, K: redb::Key + Codec, V: Codec> Table<'t, K, V> {
    fn decode_row(name: &str, (k, v): (Vec<u8>, Vec<u8>)) -> Result<(K::Owned, V::Owned), StoreError> {
        let mut kb = k.as_slice();
        let key = K::unkey(&mut kb).ok_or_else(|| corrupt(name, "key"))?;
        let val = V::unval(&v).ok_or_else(|| corrupt(name, "value"))?;
        Ok((key, val))
    }

    pub fn get(&self, k: K::SelfType<'_>) -> Result<Option<V::Owned>, StoreError> {
        match &self.inner {
            Inner::Write(t) => Ok(t.get(k).map_err(db)?.map(|v| V::own(v.value()))),
            Inner::Read(t) => Ok(t.get(k).map_err(db)?.map(|v| V::own(v.value()))),
            Inner::Missing => Ok(None),
            Inner::Pg(t) => match t.get(&enc_key::<K>(&k))? {
                Some(v) => Ok(Some(V::unval(&v).ok_or_else(|| corrupt(t.name(), "value"))?)),
                None => Ok(None),
            },
        }
    }

    /// Writes a row (replacing one of the same key).
    pub fn insert(&mut self, k: K::SelfType<'_>, v: V::SelfType<'_>) -> Result<(), StoreError> {
        match &mut self.inner {
            Inner::Write(t) => t.insert(k, v).map(|_| ()).map_err(db),
            Inner::Pg(t) => t.put(&enc_key::<K>(&k), &V::val(&v)),
            Inner::Read(_) | Inner::Missing => Err(read_only()),
        }
    }

    /// Writes a row and answers the value it replaced.
    pub fn swap(&mut self, k: K::SelfType<'_>, v: V::SelfType<'_>) -> Result<Option<V::Owned>, StoreError> {
        match &mut self.inner {
            Inner::Write(t) => Ok(t.insert(k, v).map_err(db)?.map(|old| V::own(old.value()))),
            Inner::Pg(t) => match t.swap(&enc_key::<K>(&k), &V::val(&v))? {
                Some(old) => Ok(Some(V::unval(&old).ok_or_else(|| corrupt(t.name(), "value"))?)),
                None => Ok(None),
            },
            Inner::Read(_) | Inner::Missing => Err(read_only()),
        }
    }

    /// Deletes a row, if there is one (without reading it back).
    pub fn delete(&mut self, k: K::SelfType<'_>) -> Result<(), StoreError> {
        match &mut self.inner {
            Inner::Write(t) => t.remove(k).map(|_| ()).map_err(db),
            Inner::Pg(t) => t.delete(&enc_key::<K>(&k)),
            Inner::Read(_) | Inner::Missing => Err(read_only()),
        }
    }

    /// Deletes a row and answers its value.
    pub fn remove(&mut self, k: K::SelfType<'_>) -> Result<Option<V::Owned>, StoreError> {
        match &mut self.inner {
            Inner::Write(t) => Ok(t.remove(k).map_err(db)?.map(|old| V::own(old.value()))),
            Inner::Pg(t) => match t.remove(&enc_key::<K>(&k))? {
                Some(old) => Ok(Some(V::unval(&old).ok_or_else(|| corrupt(t.name(), "value"))?)),
                None => Ok(None),
            },
            Inner::Read(_) | Inner::Missing => Err(read_only()),
        }
    }

    /// The rows whose keys are in `range`, in key order.
    pub fn range<'a>(&self, range: impl RangeBounds<K::SelfType<'a>>) -> Result<Rows<'_, K, V>, StoreError> {
        self.rows(bound::<K>(range.start_bound()), bound::<K>(range.end_bound()), false)
    }

    /// The rows whose keys are in `range`, last key first.
    pub fn range_rev<'a>(&self, range: impl RangeBounds<K::SelfType<'a>>) -> Result<Rows<'_, K, V>, StoreError> {
        self.rows(bound::<K>(range.start_bound()), bound::<K>(range.end_bound()), true)
    }

    pub fn iter(&self) -> Result<Rows<'_, K, V>, StoreError> {
        self.rows(Bound::Unbounded, Bound::Unbounded, false)
    }

    pub fn iter_rev(&self) -> Result<Rows<'_, K, V>, StoreError> {
        self.rows(Bound::Unbounded, Bound::Unbounded, true)
    }

    fn rows<'a>(
        &self,
        lo: Bound<K::SelfType<'a>>,
        hi: Bound<K::SelfType<'a>>,
        rev: bool,
    ) -> Result<Rows<'_, K, V>, StoreError> {
        match &self.inner {
            Inner::Write(t) => {
                let r = t.range::<K::SelfType<'a>>((lo, hi)).map_err(db)?;
                Ok(if rev { Box::new(r.rev().map(owned::<K, V>)) } else { Box::new(r.map(owned::<K, V>)) })
            }
            Inner::Read(t) => {
                let r = t.range::<K::SelfType<'a>>((lo, hi)).map_err(db)?;
                Ok(if rev { Box::new(r.rev().map(owned::<K, V>)) } else { Box::new(r.map(owned::<K, V>)) })
            }
            Inner::Missing => Ok(Box::new(std::iter::empty())),
            Inner::Pg(t) => {
                let name = t.name().to_owned();
                let rows = t.scan(enc_bound::<K>(&lo), enc_bound::<K>(&hi), rev);
                Ok(Box::new(rows.map(move |row| row.and_then(|r| Self::decode_row(&name, r)))))
            }
        }
    }

    /// The row with the greatest key.
    pub fn last(&self) -> Result<Option<Row<K, V>>, StoreError> {
        self.iter_rev()?.next().transpose()
    }

    pub fn first(&self) -> Result<Option<Row<K, V>>, StoreError> {
        self.iter()?.next().transpose()
    }

    /// The number of rows (PostgreSQL counts them: use it on small tables).
    pub fn len(&self) -> Result<u64, StoreError> {
        match &self.inner {
            Inner::Write(t) => t.len().map_err(db),
            Inner::Read(t) => t.len().map_err(db),
            Inner::Missing => Ok(0),
            Inner::Pg(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.iter()?.next().transpose()?.is_none())
    }
}

/// Rows written per statement when copying into PostgreSQL.
const COPY_BATCH: usize = 2000;

/// Copies every row of a table from one state into another (in the writer's transaction);
/// answers how many.
pub fn copy_table<K: redb::Key + Codec, V: Codec>(
    from: &ReadTxn<'_>,
    to: &WriteTxn<'_>,
    def: TableDefinition<'static, K, V>,
) -> Result<u64, StoreError> {
    let src = from.open_table(def)?;
    let mut n = 0;
    match to {
        WriteTxn::Pg(w) => {
            let dst = w.table(def.name())?;
            let (mut keys, mut vals) = (Vec::with_capacity(COPY_BATCH), Vec::with_capacity(COPY_BATCH));
            for row in src.iter()? {
                let (k, v) = row?;
                keys.push(enc_key::<K>(&K::borrow(&k)));
                vals.push(V::val(&V::borrow(&v)));
                n += 1;
                if keys.len() >= COPY_BATCH {
                    dst.put_many(&keys, &vals)?;
                    keys.clear();
                    vals.clear();
                }
            }
            if !keys.is_empty() {
                dst.put_many(&keys, &vals)?;
            }
        }
        WriteTxn::Redb(_) => {
            let mut dst = to.open_table(def)?;
            for row in src.iter()? {
                let (k, v) = row?;
                dst.insert(K::borrow(&k), V::borrow(&v))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The number of rows of a table.
pub fn count_table<K: redb::Key + Codec, V: Codec>(
    txn: &ReadTxn<'_>,
    def: TableDefinition<'static, K, V>,
) -> Result<u64, StoreError> {
    txn.open_table(def)?.len()
}

fn read_only() -> StoreError {
    StoreError::Corrupt { table: "kv", key: 0, message: "a write through a read transaction".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: Codec>(k: K::SelfType<'_>) -> Vec<u8> {
        enc_key::<K>(&k)
    }

    #[test]
    fn key_encodings_sort_as_redb_sorts_the_keys() {
        let strs = ["", "\0", "\0\0", "\0a", "a", "a\0", "a\0b", "a\u{1}", "ab", "b", "é"];
        for x in strs {
            for y in strs {
                assert_eq!(enc::<&str>(x).cmp(&enc::<&str>(y)), x.cmp(y), "{x:?} {y:?}");
                for (i, j) in [(0u64, 1u64), (1, 0), (7, 7), (u64::MAX, 3)] {
                    let a = enc::<(&str, u64)>((x, i));
                    let b = enc::<(&str, u64)>((y, j));
                    assert_eq!(a.cmp(&b), (x, i).cmp(&(y, j)), "{x:?},{i} {y:?},{j}");
                    let a = enc::<(u64, &str)>((i, x));
                    let b = enc::<(u64, &str)>((j, y));
                    assert_eq!(a.cmp(&b), (i, x).cmp(&(j, y)), "{i},{x:?} {j},{y:?}");
                }
            }
            let mut b = enc::<(&str, u64)>((x, 42)).leak() as &[u8];
            assert_eq!(<(&str, u64)>::unkey(&mut b), Some((x.to_owned(), 42)));
            assert!(b.is_empty());
        }
        for (a, b) in [(0u64, 1u64), (255, 256), (1 << 40, 1 << 41), (u64::MAX - 1, u64::MAX)] {
            assert!(enc::<u64>(a) < enc::<u64>(b));
            assert!(enc::<(u64, u64)>((a, b)) < enc::<(u64, u64)>((b, a)));
        }
        assert_eq!(<(u64, u64, u64)>::unval(&<(u64, u64, u64)>::val(&(1, 2, 3))), Some((1, 2, 3)));
        assert_eq!(<&str>::unval(&<&str>::val(&"a\0b")), Some("a\0b".to_owned()));
    }

    const COUNTS: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("kv_test_counts");

    /// A count added to in one transaction, read in the next (and in the same one).
    fn a_count_adds_up_never_goes_below_zero_and_goes_at_zero(place: &crate::store::testing::Place) {
        let s = place.open();
        let db = s.database();
        let read = |key: &str| db.begin_read().expect("read").open_table(COUNTS).expect("table").get(key).expect("get");
        let add = |steps: &[(&str, i64)]| {
            let txn = db.begin_write(true).expect("write");
            {
                let mut t = txn.open_table(COUNTS).expect("table");
                for (k, d) in steps {
                    t.add(k, *d).expect("add");
                }
            }
            txn.commit().expect("commit");
        };
        add(&[("a", 1), ("a", 2), ("b", 5)]);
        assert_eq!((read("a"), read("b")), (Some(3), Some(5)), "{}", place.backend);
        add(&[("a", -3), ("b", -2), ("c", -4)]);
        assert_eq!((read("a"), read("b"), read("c")), (None, Some(3), None), "{}: zero is no row", place.backend);
        add(&[("b", -10), ("d", 0)]);
        assert_eq!((read("b"), read("d")), (None, None), "{}: never below zero", place.backend);
        add(&[("e", 1 << 40), ("e", 1)]);
        assert_eq!(read("e"), Some((1 << 40) + 1), "{}", place.backend);
        let txn = db.begin_write(true).expect("write");
        {
            let mut t = txn.open_table(COUNTS).expect("table");
            t.add("f", 2).expect("add");
            t.add("f", 3).expect("add");
            assert_eq!(t.get("f").expect("get"), Some(5), "{}: read in the same transaction", place.backend);
        }
        drop(txn);
        assert_eq!(read("f"), None, "{}: a transaction not committed adds nothing", place.backend);
    }

    crate::store::testing::on_each_backend!(a_count_adds_up_never_goes_below_zero_and_goes_at_zero);
}
