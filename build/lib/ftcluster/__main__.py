from ftcluster.cli import main

raise SystemExit(main())
