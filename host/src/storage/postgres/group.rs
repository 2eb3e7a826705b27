//! Group commit: invocations' commits that wait together land in one PostgreSQL transaction.
//!
//! At most `lanes` groups are in flight per host. A commit that finds a lane free starts it;
//! a lane takes everyone queued by then (up to [`MAX_GROUP`] commits and [`MAX_LOCKS`] locks)
//! as one group: one transaction, one wait for the disk (a group of one is one statement). In
//! a lane a commit only tries its locks; one whose lock another transaction holds, or whose
//! group failed before its end, is [`Outcome::Alone`]: nothing of it landed, and it commits
//! again alone, outside the lanes, waiting for its locks. A lane therefore never waits for a
//! lock: groups cannot deadlock with each other or with lone commits (which take their locks
//! in one global order), a held key holds up only the commits that need it, and one commit
//! the server refuses fails only itself.

use crate::storage::CommitError;
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Most commits in one group.
const MAX_GROUP: usize = 32;
/// Most advisory locks one group takes, over all its commits (the server's lock table is
/// shared by every session); a commit that needs more makes a group by itself.
const MAX_LOCKS: usize = 512;

/// What became of one commit of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Landed,
    /// What it read has changed: run the invocation again.
    Conflict,
    /// Nothing of it landed: another transaction holds one of its locks, or a statement of its
    /// group failed. It commits again alone.
    Alone,
}

/// How commits land.
#[async_trait]
pub(super) trait Lands: Send + Sync + 'static {
    type Commit: Send + Sync + 'static;

    /// The advisory locks `commit` takes.
    fn locks(commit: &Self::Commit) -> usize;

    /// Lands `commit` in a transaction of its own, waiting for its locks.
    async fn alone(&self, commit: &Self::Commit) -> Result<(), CommitError>;

    /// Lands `commits` (one or more) in one transaction, in order, each trying its locks
    /// without waiting: an outcome per commit, or an error (the group's outcome unknown).
    async fn together(&self, commits: &[Self::Commit]) -> Result<Vec<Outcome>, CommitError>;
}

type Reply = oneshot::Sender<Result<(), CommitError>>;

struct Queue<C> {
    waiting: VecDeque<(C, Reply)>,
    /// Lanes serving the queue now.
    running: usize,
}

struct Shared<L: Lands> {
    lands: L,
    lanes: usize,
    queue: Mutex<Queue<L::Commit>>,
}

/// The commits of one store, grouped.
pub(super) struct Group<L: Lands>(Arc<Shared<L>>);

impl<L: Lands> Clone for Group<L> {
    fn clone(&self) -> Self {
        Group(self.0.clone())
    }
}

impl<L: Lands> Group<L> {
    /// Commits through `lands`, at most `lanes` groups at once.
    pub(super) fn new(lands: L, lanes: usize) -> Self {
        Group(Arc::new(Shared {
            lands,
            lanes: lanes.max(1),
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                running: 0,
            }),
        }))
    }

    /// Lands `commit`, alone or with the commits waiting with it.
    pub(super) async fn commit(&self, commit: L::Commit) -> Result<(), CommitError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.lock();
            queue.waiting.push_back((commit, reply));
            let free = queue.running < self.0.lanes;
            queue.running += usize::from(free);
            free
        };
        if start {
            // A task, not this caller: a caller that gives up must not strand the others. The
            // lane is given back however the task ends, even unpolled.
            tokio::spawn(self.clone().serve(Lane(Some(self.clone()))));
        }
        (answer.await).unwrap_or_else(|_| Err(anyhow::anyhow!("the commit task ended").into()))
    }

    /// Lands groups while commits wait.
    async fn serve(self, mut lane: Lane<L>) {
        loop {
            let group = {
                let mut queue = self.lock();
                let group = next_group::<L>(&mut queue.waiting);
                if group.is_empty() {
                    queue.running -= 1;
                    lane.0 = None;
                    return;
                }
                group
            };
            self.land(group).await;
        }
    }

    async fn land(&self, group: Vec<(L::Commit, Reply)>) {
        let (commits, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        match self.0.lands.together(&commits).await {
            Ok(outcomes) => {
                // A reply left without an outcome (none can be) drops: its caller hears so.
                for ((commit, reply), outcome) in commits.into_iter().zip(replies).zip(outcomes) {
                    let result = match outcome {
                        Outcome::Landed => Ok(()),
                        Outcome::Conflict => Err(CommitError::Conflict),
                        Outcome::Alone => {
                            let this = self.clone();
                            tokio::spawn(async move {
                                let _ = reply.send(this.0.lands.alone(&commit).await);
                            });
                            continue;
                        }
                    };
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy(&e)));
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<L::Commit>> {
        self.0.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The commits at the head of `waiting` that make one group: at least one, at most
/// [`MAX_GROUP`], and past the first no more than [`MAX_LOCKS`] locks in all.
fn next_group<L: Lands>(waiting: &mut VecDeque<(L::Commit, Reply)>) -> Vec<(L::Commit, Reply)> {
    let mut group = Vec::new();
    let mut locks = 0;
    while let Some((commit, _)) = waiting.front() {
        locks += L::locks(commit);
        if group.len() == MAX_GROUP || (!group.is_empty() && locks > MAX_LOCKS) {
            break;
        }
        group.extend(waiting.pop_front());
    }
    group
}

/// The same error again, for each commit of a group that failed.
fn copy(e: &CommitError) -> CommitError {
    match e {
        CommitError::Conflict => CommitError::Conflict,
        CommitError::Full(m) => CommitError::Full(m.clone()),
        CommitError::Storage(e) => CommitError::Storage(anyhow::anyhow!("{e:#}")),
    }
}

/// Gives up a lane whose task ended early (a panic): if it was the last, the commits still
/// queued hear that their task ended instead of waiting for one that never comes.
struct Lane<L: Lands>(Option<Group<L>>);

impl<L: Lands> Drop for Lane<L> {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            let mut queue = group.lock();
            queue.running -= 1;
            if queue.running == 0 {
                queue.waiting.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commits in memory, by number: the last digit says what becomes of one in a group (1
    /// conflicts, 2 must go alone, 7 panics, 8 fails the group); 1000 and above take all of a
    /// group's locks.
    #[derive(Default)]
    struct Memory {
        /// The commits of each group, in order.
        groups: Mutex<Vec<Vec<u32>>>,
        /// Commits that went alone.
        alone: Mutex<Vec<u32>>,
        landed: Mutex<Vec<u32>>,
    }

    #[async_trait]
    impl Lands for Memory {
        type Commit = u32;

        fn locks(commit: &u32) -> usize {
            if *commit >= 1000 {
                MAX_LOCKS
            } else {
                1
            }
        }

        async fn alone(&self, commit: &u32) -> Result<(), CommitError> {
            self.alone.lock().unwrap().push(*commit);
            tokio::task::yield_now().await;
            self.landed.lock().unwrap().push(*commit);
            Ok(())
        }

        async fn together(&self, commits: &[u32]) -> Result<Vec<Outcome>, CommitError> {
            self.groups.lock().unwrap().push(commits.to_vec());
            tokio::task::yield_now().await;
            assert!(commits.iter().all(|c| c % 10 != 7), "a bug");
            if commits.iter().any(|c| c % 10 == 8) {
                return Err(anyhow::anyhow!("server gone").into());
            }
            let outcome = |c: &u32| match c % 10 {
                1 => Outcome::Conflict,
                2 => Outcome::Alone,
                _ => {
                    self.landed.lock().unwrap().push(*c);
                    Outcome::Landed
                }
            };
            Ok(commits.iter().map(outcome).collect())
        }
    }

    fn groups(group: &Group<Memory>) -> Vec<Vec<u32>> {
        group.0.lands.groups.lock().unwrap().clone()
    }

    fn alone(group: &Group<Memory>) -> Vec<u32> {
        group.0.lands.alone.lock().unwrap().clone()
    }

    async fn commit_all(group: &Group<Memory>, commits: &[u32]) -> Vec<Result<(), CommitError>> {
        futures_util::future::join_all(commits.iter().map(|c| group.commit(*c))).await
    }

    #[tokio::test]
    async fn commits_waiting_together_land_in_groups_and_a_lone_one_in_its_own() {
        let group = Group::new(Memory::default(), 1);
        let commits: Vec<u32> = (0..50).map(|c| c * 10).collect();
        let results = commit_all(&group, &commits).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let sizes: Vec<usize> = groups(&group).iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_GROUP, 50 - MAX_GROUP]);
        let mut landed = group.0.lands.landed.lock().unwrap().clone();
        landed.sort_unstable();
        assert_eq!(landed, commits);
        // Nobody waits: the lane is given back, and the next commit is a group of one.
        assert_eq!(group.lock().running, 0);
        group.commit(990).await.unwrap();
        assert_eq!(groups(&group).last().unwrap(), &[990]);
        assert!(alone(&group).is_empty());
    }

    #[tokio::test]
    async fn a_conflict_is_its_commits_own_and_a_busy_commit_goes_alone_after_its_group() {
        let group = Group::new(Memory::default(), 1);
        let results = commit_all(&group, &[10, 21, 32, 40]).await;
        assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok());
        assert!(matches!(results[1], Err(CommitError::Conflict)));
        assert_eq!(groups(&group), [vec![10, 21, 32, 40]]);
        assert_eq!(alone(&group), [32]);
    }

    #[tokio::test]
    async fn a_failed_group_fails_each_of_its_commits_and_a_panic_strands_nobody() {
        let group = Group::new(Memory::default(), 1);
        let results = commit_all(&group, &[10, 18, 20]).await;
        for r in &results {
            let failed =
                matches!(r, Err(CommitError::Storage(e)) if e.to_string().contains("server gone"));
            assert!(failed, "{r:?}");
        }
        // The task panics with commits queued behind it: they hear so, and later ones land.
        let queued_later = async {
            tokio::task::yield_now().await;
            commit_all(&group, &[20, 30]).await
        };
        let (first, later) = futures_util::future::join(group.commit(17), queued_later).await;
        assert!(
            first.is_err() && later.iter().all(Result::is_err),
            "{later:?}"
        );
        assert_eq!(groups(&group)[1..], [vec![17]]);
        assert_eq!(group.lock().running, 0);
        group.commit(40).await.unwrap();
    }

    #[test]
    fn a_group_stops_at_its_size_or_its_locks_but_takes_at_least_one() {
        let queue = |commits: &[u32]| -> VecDeque<(u32, Reply)> {
            commits.iter().map(|c| (*c, oneshot::channel().0)).collect()
        };
        let numbers =
            |group: Vec<(u32, Reply)>| group.into_iter().map(|(c, _)| c).collect::<Vec<_>>();
        let mut waiting = queue(&(0..40).collect::<Vec<_>>());
        assert_eq!(next_group::<Memory>(&mut waiting).len(), MAX_GROUP);
        assert_eq!(next_group::<Memory>(&mut waiting).len(), 40 - MAX_GROUP);
        assert!(next_group::<Memory>(&mut waiting).is_empty());
        let mut waiting = queue(&[1000, 10, 20, 1001]);
        assert_eq!(numbers(next_group::<Memory>(&mut waiting)), [1000]);
        assert_eq!(numbers(next_group::<Memory>(&mut waiting)), [10, 20]);
        assert_eq!(numbers(next_group::<Memory>(&mut waiting)), [1001]);
    }
}
