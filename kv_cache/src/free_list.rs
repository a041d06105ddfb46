//! The pool's free list: an intrusive doubly linked list over block indices,
//! so that pushing at either end and removing from the middle are O(1).
//!
//! Invariants:
//! - `len` is the number of linked entries, and `on_list[i]` is true exactly
//!   for those;
//! - following `next` from `head` visits every linked entry once and ends at
//!   `tail`; `prev` mirrors it.
//!
//! Order is the pool's eviction order: the head is evicted first.

/// End-of-list marker.
pub(crate) const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Link {
    prev: u32,
    next: u32,
    on_list: bool,
}

/// A doubly linked list of the indices `0..capacity`, each at most once.
#[derive(Debug)]
pub(crate) struct FreeList {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeList {
    /// An empty list for indices below `capacity`.
    pub(crate) fn new(capacity: usize) -> Self {
        FreeList {
            links: vec![
                Link {
                    prev: NIL,
                    next: NIL,
                    on_list: false,
                };
                capacity
            ],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.links[id as usize].on_list
    }

    /// The entry evicted first, if any.
    pub(crate) fn head(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    pub(crate) fn push_back(&mut self, id: u32) {
        let link = &mut self.links[id as usize];
        debug_assert!(!link.on_list);
        link.on_list = true;
        link.prev = self.tail;
        link.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.links[self.tail as usize].next = id;
        }
        self.tail = id;
        self.len += 1;
    }

    pub(crate) fn push_front(&mut self, id: u32) {
        let link = &mut self.links[id as usize];
        debug_assert!(!link.on_list);
        link.on_list = true;
        link.prev = NIL;
        link.next = self.head;
        if self.head == NIL {
            self.tail = id;
        } else {
            self.links[self.head as usize].prev = id;
        }
        self.head = id;
        self.len += 1;
    }

    pub(crate) fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let link = &mut self.links[id as usize];
            debug_assert!(link.on_list);
            link.on_list = false;
            (link.prev, link.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize].prev = prev;
        }
        self.len -= 1;
    }

    /// Linked entries from head to tail.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut id = self.head;
        std::iter::from_fn(move || {
            if id == NIL {
                return None;
            }
            let current = id;
            id = self.links[current as usize].next;
            Some(current)
        })
    }
}
